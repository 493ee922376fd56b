"""The privacy ledger's plain records (a run's plan, a budget check, a summary row) and the checks on a charge.

σ is fixed when a run is planned, so a re-plan or a charge must match the stored plan exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedmed.core.log import logger
from fedmed.privacy.errors import PrivacyBudgetExhaustedError, PrivacyConfigError


@dataclass(frozen=True)
class RunPlan:
    """The DP parameters fixed for one run on one dataset; σ never changes within a run."""

    dataset: str
    run_id: str
    noise_multiplier: float
    sample_rate: float
    planned_steps: int
    target_epsilon: float
    delta: float
    accountant: str
    created_at: str


@dataclass(frozen=True)
class BudgetCheck:
    """Whether one more round of ``steps`` steps fits the dataset's budget, and why not if it does not."""

    allowed: bool
    site: str
    dataset: str
    epsilon_spent: float
    epsilon_after: float
    target_epsilon: float
    message: str | None  # the refusal, None when allowed

    def raise_if_refused(self) -> None:
        if not self.allowed:
            raise PrivacyBudgetExhaustedError(self.message)


@dataclass(frozen=True)
class LedgerSummaryRow:
    """One (dataset, run): its own rounds and steps, and the dataset's cumulative spend against its target."""

    dataset: str
    run_id: str
    rounds: int  # distinct rounds charged in this run
    attempts: int  # charges in this run (> rounds when rounds were retried)
    steps: int
    noise_multiplier: float
    epsilon_spent: float  # whole dataset, all runs, at this run's δ and accountant
    target_epsilon: float
    remaining_epsilon: float
    delta: float
    accountant: str


def _reuse(existing: RunPlan, requested: dict[str, object]) -> RunPlan:
    _check_same_plan(existing, requested)
    logger.info(
        "privacy: reusing σ=%.4f fixed for run %s on %s", existing.noise_multiplier, existing.run_id, existing.dataset
    )
    return existing


def _check_same_plan(existing: RunPlan, requested: dict[str, object]) -> None:
    differences = [
        f"{name} {getattr(existing, name)!r} → {value!r}"
        for name, value in requested.items()
        if not _same(getattr(existing, name), value)
    ]
    if differences:
        raise PrivacyConfigError(
            f"run {existing.run_id!r} on {existing.dataset!r} was planned with other privacy settings "
            f"({', '.join(differences)}); σ is fixed per run, so start a new run id to change them"
        )


def _same(stored: object, requested: object) -> bool:
    if isinstance(stored, float) and isinstance(requested, float):
        return math.isclose(stored, requested, rel_tol=1e-12, abs_tol=0.0)
    return stored == requested


def _check_plan_is_for(plan: RunPlan, *, dataset: str, run_id: str) -> None:
    if (plan.dataset, plan.run_id) != (dataset, run_id):
        raise PrivacyConfigError(
            f"plan is for run {plan.run_id!r} on {plan.dataset!r}, not run {run_id!r} on {dataset!r}; "
            "pass the plan returned by plan_run for this run and dataset"
        )


def _check_steps(steps: int) -> None:
    if steps < 1:
        raise PrivacyConfigError(f"a round must charge ≥ 1 DP-SGD step, got {steps}; check the local epochs")
