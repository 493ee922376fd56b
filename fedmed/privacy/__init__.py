"""Site-owned differential-privacy accounting: σ calibration, ε from history, the persistent ledger.

Import-light on purpose: nothing here imports Opacus (and so torch) until ε is actually computed.
"""

from __future__ import annotations

from fedmed.privacy.accounting import (
    ACCOUNTANTS,
    MAX_NOISE_MULTIPLIER,
    HistoryEntry,
    calibrate_noise_multiplier,
    compress_history,
    epsilon_spent,
)
from fedmed.privacy.errors import (
    PrivacyBudgetExhaustedError,
    PrivacyConfigError,
    PrivacyLedgerError,
    budget_exhausted_message,
)
from fedmed.privacy.ledger import LEDGER_FILENAME, BudgetCheck, LedgerSummaryRow, PrivacyLedger, RunPlan
from fedmed.privacy.opacus_import import import_opacus

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
    "import_opacus",
]
