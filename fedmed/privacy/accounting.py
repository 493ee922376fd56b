"""Sample-level DP accounting over a site's whole history of DP-SGD steps, via Opacus' accountants.

A history entry is ``(noise_multiplier, sample_rate, steps)``, exactly like Opacus'
``accountant.history``. Opacus is imported lazily so that importing fedmed.privacy stays cheap.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence

from fedmed.core.log import logger
from fedmed.core.opacus import import_opacus
from fedmed.privacy.errors import PrivacyBudgetExhaustedError, PrivacyConfigError

HistoryEntry = tuple[float, float, int]

ACCOUNTANTS = ("rdp", "prv")

# Above this σ the model learns nothing useful; reaching it means the budget cannot pay for the plan.
MAX_NOISE_MULTIPLIER = 1e3

# PRV accuracy: Opacus' defaults. eps_error bounds the gap between PRV's estimate and the upper
# bound it returns (we always get the upper bound); delta_error defaults to delta / 1000.
PRV_EPS_ERROR = 0.01

# Bisection halves the σ interval each step; numerical noise in PRV can make ε(σ) slightly
# non-monotone, so the search is capped and falls back to the last σ known to fit the budget.
_MAX_BISECTION_STEPS = 60


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Poisson batches per epoch: Opacus samples each example with rate 1 / this."""
    return math.ceil(num_examples / min(batch_size, num_examples))


def sample_rate(num_examples: int, batch_size: int) -> float:
    return 1.0 / steps_per_epoch(num_examples, batch_size)


def compress_history(history: Iterable[HistoryEntry]) -> list[HistoryEntry]:
    """Merge entries with the same (σ, q) into one, summing steps, in first-seen order.

    Composition is commutative for both RDP (a sum) and PRV (a convolution), so grouping equal
    mechanisms anywhere in the history gives the same ε. It matters for speed: PRV costs about
    1.5 s per distinct entry, so 300 per-round entries would take minutes, their compression ~1 s.
    """
    steps_by_mechanism: dict[tuple[float, float], int] = {}
    for noise_multiplier, sample_rate, steps in history:
        if steps <= 0:
            continue
        key = (float(noise_multiplier), float(sample_rate))
        steps_by_mechanism[key] = steps_by_mechanism.get(key, 0) + int(steps)
    return [(sigma, rate, steps) for (sigma, rate), steps in steps_by_mechanism.items()]


def epsilon_spent(history: Sequence[HistoryEntry], *, delta: float, accountant: str) -> float:
    """ε spent at ``delta`` by every DP-SGD step in ``history``, per the named Opacus accountant."""
    _check_accountant(accountant)
    _check_delta(delta)
    compressed = compress_history(history)
    if not compressed:
        return 0.0
    return _epsilon(compressed, delta=delta, accountant=accountant)


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    planned_steps: int,
    prior_history: Sequence[HistoryEntry],
    accountant: str,
    epsilon_tolerance: float = 0.01,
) -> float:
    """Smallest σ (to within ``epsilon_tolerance`` in ε) keeping prior history + the plan ≤ target ε.

    The plan is ``planned_steps`` DP-SGD steps at (σ, ``sample_rate``): a whole run, calibrated
    once; recalibrating every round would let each round spend the full target.

    Same search as ``opacus.accountants.utils.get_noise_multiplier`` (double σ until ε fits, then
    bisect until ε is within ``epsilon_tolerance`` below the target), but charged on top of what
    the dataset has already spent; with an empty prior history the results coincide.
    """
    _check_accountant(accountant)
    _check_delta(delta)
    _check_plan(target_epsilon=target_epsilon, sample_rate=sample_rate, planned_steps=planned_steps)
    if not epsilon_tolerance > 0:
        raise PrivacyConfigError(f"epsilon_tolerance must be > 0, got {epsilon_tolerance}; pass e.g. 0.01")
    prior = compress_history(prior_history)
    prior_spent = _epsilon(prior, delta=delta, accountant=accountant) if prior else 0.0
    if prior_spent >= target_epsilon:
        raise PrivacyBudgetExhaustedError(
            f"privacy budget exhausted (ε {prior_spent:.2f} spent of {target_epsilon:.2f}) before this run; "
            "this dataset cannot be trained on again under this target"
        )

    def epsilon_with(sigma: float) -> float:
        history = compress_history([*prior, (sigma, sample_rate, planned_steps)])
        return _epsilon(history, delta=delta, accountant=accountant)

    sigma_low, sigma_high, eps_high = 0.0, 10.0, math.inf
    while eps_high > target_epsilon:
        sigma_high = 2 * sigma_high
        if sigma_high > MAX_NOISE_MULTIPLIER:
            raise _too_small_error(
                target_epsilon=target_epsilon,
                delta=delta,
                planned_steps=planned_steps,
                sample_rate=sample_rate,
                prior_spent=prior_spent,
            )
        eps_high = epsilon_with(sigma_high)

    for _ in range(_MAX_BISECTION_STEPS):
        if target_epsilon - eps_high <= epsilon_tolerance:
            break
        sigma = (sigma_low + sigma_high) / 2
        eps = epsilon_with(sigma)
        if eps < target_epsilon:
            sigma_high, eps_high = sigma, eps
        else:
            sigma_low = sigma
    logger.debug(
        "calibrated σ=%.4f for %d steps at q=%.4g: ε %.3f of %.3f (%.3f spent before, %s)",
        sigma_high,
        planned_steps,
        sample_rate,
        eps_high,
        target_epsilon,
        prior_spent,
        accountant,
    )
    return sigma_high


def _epsilon(compressed: list[HistoryEntry], *, delta: float, accountant: str) -> float:
    import_opacus()
    # Imported here, when ε is computed: importing fedmed.privacy must stay light (no torch).
    import numpy as np
    from opacus.accountants import create_accountant

    engine = create_accountant(mechanism=accountant)
    engine.history = list(compressed)
    with warnings.catch_warnings():
        # RDP warns when its largest order is the optimum (small σ probed while calibrating, or a
        # history of very noisy steps); the bound is still valid, and the warning only alarms
        # operators reading `fedmed site budget`.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        if accountant == "prv":
            # PRV evaluates log(0) on branches np.where discards (q = 1); the warnings are noise.
            with np.errstate(divide="ignore", invalid="ignore"):
                return float(engine.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR))
        return float(engine.get_epsilon(delta=delta))


def _too_small_error(
    *, target_epsilon: float, delta: float, planned_steps: int, sample_rate: float, prior_spent: float
) -> Exception:
    plan = f"{planned_steps} steps at sample rate {sample_rate:.4g}"
    if prior_spent > 0:
        return PrivacyBudgetExhaustedError(
            f"privacy budget nearly exhausted (ε {prior_spent:.2f} spent of {target_epsilon:.2f}): "
            f"the rest cannot pay for {plan} even with noise multiplier {MAX_NOISE_MULTIPLIER:g}; "
            "plan fewer rounds or local epochs"
        )
    return PrivacyConfigError(
        f"privacy budget too small for the planned steps: (ε {target_epsilon:g}, δ {delta:g}) needs a noise "
        f"multiplier above {MAX_NOISE_MULTIPLIER:g} for {plan}; plan fewer rounds or local epochs, "
        "a smaller batch, or a larger ε"
    )


def _check_accountant(accountant: str) -> None:
    if accountant not in ACCOUNTANTS:
        raise PrivacyConfigError(f"unknown privacy accountant {accountant!r}; use one of {', '.join(ACCOUNTANTS)}")


def _check_delta(delta: float) -> None:
    if not 0 < delta < 1:
        raise PrivacyConfigError(f"δ must be in (0, 1), got {delta}; use e.g. 1e-5 or below 1/number of records")


def _check_plan(*, target_epsilon: float, sample_rate: float, planned_steps: int) -> None:
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise PrivacyConfigError(f"target ε must be a positive number, got {target_epsilon}; set e.g. 8.0")
    if not 0 < sample_rate <= 1:
        raise PrivacyConfigError(
            f"sample rate must be in (0, 1], got {sample_rate}; it is batch size / number of training records"
        )
    if planned_steps < 1:
        raise PrivacyConfigError(f"planned steps must be ≥ 1, got {planned_steps}; check rounds and local epochs")
