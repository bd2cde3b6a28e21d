"""DP accounting for medfdd sites: an Opacus accountant wrapper (RDP, Mironov 2017; PRV, Gopi et al. 2021), noise
calibration to a site's (epsilon, delta) budget over all planned rounds, and the write-ahead site ledger."""

from .accountant import (
    ACCOUNTANTS,
    DEFAULT_MECHANISM,
    PRIVACY_UNITS,
    AccountingError,
    BudgetExceeded,
    Charge,
    InvalidPrivacyParameter,
    PrivacyError,
    calibrate_noise,
    calibrate_round_noise,
    epsilon_for,
)
from .ledger import (
    LEDGER_FILENAME,
    Budget,
    ChargeConflict,
    LedgerCorrupt,
    LedgerEntry,
    LedgerMismatch,
    LedgerMissing,
    LedgerWriteError,
    PrivacyLedger,
    check_not_lost,
)

__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_MECHANISM",
    "LEDGER_FILENAME",
    "PRIVACY_UNITS",
    "AccountingError",
    "Budget",
    "BudgetExceeded",
    "Charge",
    "ChargeConflict",
    "InvalidPrivacyParameter",
    "LedgerCorrupt",
    "LedgerEntry",
    "LedgerMismatch",
    "LedgerMissing",
    "LedgerWriteError",
    "PrivacyError",
    "PrivacyLedger",
    "calibrate_noise",
    "calibrate_round_noise",
    "check_not_lost",
    "epsilon_for",
]
