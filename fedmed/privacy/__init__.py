"""Differential-privacy accounting: σ calibration, ε from a history of steps, the site's ledger store.

Imports only fedmed.core. Import-light on purpose: nothing here imports Opacus (and so torch)
until ε is actually computed.
"""

from __future__ import annotations

from fedmed.privacy.accounting import (
    ACCOUNTANTS,
    MAX_NOISE_MULTIPLIER,
    HistoryEntry,
    calibrate_noise_multiplier,
    compress_history,
    epsilon_spent,
    sample_rate,
    steps_per_epoch,
)
from fedmed.privacy.errors import (
    PrivacyBudgetExhaustedError,
    PrivacyConfigError,
    PrivacyLedgerError,
    budget_exhausted_message,
)
from fedmed.privacy.ledger import LEDGER_FILENAME, BudgetCheck, LedgerSummaryRow, PrivacyLedger, RunPlan

__all__ = [
    "ACCOUNTANTS",
    "LEDGER_FILENAME",
    "MAX_NOISE_MULTIPLIER",
    "BudgetCheck",
    "HistoryEntry",
    "LedgerSummaryRow",
    "PrivacyBudgetExhaustedError",
    "PrivacyConfigError",
    "PrivacyLedger",
    "PrivacyLedgerError",
    "RunPlan",
    "budget_exhausted_message",
    "calibrate_noise_multiplier",
    "compress_history",
    "epsilon_spent",
    "sample_rate",
    "steps_per_epoch",
]
