"""Privacy-budget errors: each message names what is wrong and how to fix it."""

from __future__ import annotations

from fedmed.core.errors import FedmedError


class PrivacyBudgetExhaustedError(FedmedError):
    """The site's (ε, δ) budget for a dataset cannot pay for the requested training."""


class PrivacyConfigError(FedmedError):
    """A privacy setting (target ε, δ, accountant, sample rate, steps, plan) is invalid or impossible."""


class PrivacyLedgerError(FedmedError):
    """The site's privacy ledger file is unreadable, corrupt or not a fedmed ledger."""


def budget_exhausted_message(site: str, *, spent: float, target: float, would_reach: float | None = None) -> str:
    """The one wording operators and tests see when a site refuses to train for privacy reasons."""
    reach = "" if would_reach is None else f", this round would reach {would_reach:.2f}"
    return f"site {site}: privacy budget exhausted (ε {spent:.2f} spent of {target:.2f}{reach})"
