"""Thin wrapper over Opacus's accountants: epsilon of a list of mechanism charges, and noise calibration.

No privacy maths lives here. Every number comes from an Opacus accountant fed the charge history as
(noise_multiplier, sample_rate, steps) tuples of the Poisson-subsampled Gaussian mechanism:

- ``rdp`` (default): Renyi DP, Mironov, "Renyi Differential Privacy", CSF 2017 (composition adds RDP curves,
  Prop. 1; conversion to (epsilon, delta)-DP), with the subsampled-Gaussian bound of Mironov, Talwar & Zhang 2019.
- ``prv``: numerical composition of privacy loss random variables, Gopi, Lee & Wutschitz, "Numerical Composition
  of Differential Privacy", NeurIPS 2021 (we report its epsilon *upper* bound).

A non-DP charge (``dp=False`` or ``noise_multiplier == 0``, the ``--no-dp`` baselines) has epsilon = inf, and so
does any composition that contains one.
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.utils import get_noise_multiplier

from medfdd.errors import MedfddError

ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")
DEFAULT_MECHANISM = "poisson_subsampled_gaussian"

# Renyi orders of the RDP accountant: Opacus's defaults (up to 63) plus 128..1024, as dp-accounting's
# DEFAULT_RDP_ORDERS. The (epsilon, delta) conversion pays about log(1/delta)/(alpha - 1), so budgets below ~0.2 at
# delta 1e-5 are unreachable with orders <= 63 whatever the noise; more orders can only tighten the bound (the
# minimum over orders, each a valid bound).
RDP_ORDERS: tuple[float, ...] = (*RDPAccountant.DEFAULT_ALPHAS, 128, 256, 512, 1024)

__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_MECHANISM",
    "RDP_ORDERS",
    "AccountingError",
    "BudgetExceeded",
    "Charge",
    "InvalidPrivacyParameter",
    "PrivacyError",
    "calibrate_noise",
    "calibrate_round_noise",
    "epsilon_for",
]


class PrivacyError(MedfddError):
    """Base class of the typed errors raised by ``privacy.accounting``."""


class InvalidPrivacyParameter(PrivacyError, ValueError):
    """A privacy number (epsilon, delta, sample rate, steps, noise multiplier, accountant) is out of range."""


class AccountingError(PrivacyError):
    """The accountant could not produce a usable epsilon (it failed or returned NaN)."""


class BudgetExceeded(PrivacyError):
    """A charge (or a plan) would take the site's epsilon over its budget; nothing was recorded or released."""


# ----------------------------------------------------------------------------------------------- validation


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_epsilon(epsilon: Any, *, where: str, allow_inf: bool = False) -> float:
    """epsilon > 0 (finite unless ``allow_inf``)."""
    if not _is_number(epsilon) or math.isnan(epsilon) or epsilon <= 0 or (math.isinf(epsilon) and not allow_inf):
        constraint = "> 0 (inf only for a --no-dp ledger)" if allow_inf else "a finite number > 0"
        raise InvalidPrivacyParameter(
            f"{where}: epsilon",
            f"epsilon={epsilon!r} must be {constraint}",
            "set privacy.epsilon to a positive budget such as 1.0 (use --no-dp / dp: false for a non-private baseline)",
        )
    return float(epsilon)


def check_delta(delta: Any, *, where: str) -> float:
    """0 < delta < 1."""
    if not _is_number(delta) or math.isnan(delta) or not 0 < delta < 1:
        raise InvalidPrivacyParameter(
            f"{where}: delta",
            f"delta={delta!r} is not in the open interval (0, 1)",
            "set privacy.delta below 1/n for n training records, e.g. 1e-5",
        )
    return float(delta)


def check_sample_rate(sample_rate: Any, *, where: str) -> float:
    """0 < sample_rate <= 1 (Poisson sampling probability)."""
    if not _is_number(sample_rate) or math.isnan(sample_rate) or not 0 < sample_rate <= 1:
        raise InvalidPrivacyParameter(
            f"{where}: sample_rate",
            f"sample_rate={sample_rate!r} is not in (0, 1]",
            "use the Poisson sampling probability batch_size / n_records (at most 1)",
        )
    return float(sample_rate)


def check_steps(steps: Any, *, where: str, name: str = "steps") -> int:
    """An integer >= 1."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidPrivacyParameter(
            f"{where}: {name}",
            f"{name}={steps!r} must be an integer >= 1",
            f"pass the planned number of {name} as a positive integer",
        )
    return int(steps)


def check_noise_multiplier(noise_multiplier: Any, *, where: str) -> float:
    """A finite number >= 0 (0 means no noise: a non-DP charge)."""
    if not _is_number(noise_multiplier) or not math.isfinite(noise_multiplier) or noise_multiplier < 0:
        raise InvalidPrivacyParameter(
            f"{where}: noise_multiplier",
            f"noise_multiplier={noise_multiplier!r} must be a finite number >= 0",
            "use the sigma returned by calibrate_noise / calibrate_round_noise (0 only for --no-dp)",
        )
    return float(noise_multiplier)


PRIVACY_UNITS = ("scan", "patient")  # what one record is: a scan, or a patient contributing at most one scan


def check_unit(unit: Any, *, where: str) -> str:
    if unit not in PRIVACY_UNITS:
        raise InvalidPrivacyParameter(f"{where}: unit", f"unit={unit!r} is not one of {list(PRIVACY_UNITS)}",
                                      "set privacy.unit to 'scan' (default) or 'patient'")
    return str(unit)


def check_accountant(accountant: Any, *, where: str) -> str:
    if accountant not in ACCOUNTANTS:
        raise InvalidPrivacyParameter(
            f"{where}: accountant",
            f"accountant={accountant!r} is not one of {list(ACCOUNTANTS)}",
            "set privacy.accountant to 'rdp' (default) or 'prv'",
        )
    return str(accountant)


# ----------------------------------------------------------------------------------------------- charges


@dataclass(frozen=True)
class Charge:
    """One release's cost: ``steps`` compositions of the Poisson-subsampled Gaussian mechanism.

    ``round`` and ``purpose`` identify the charge in a ledger (a resumed run re-charging the same key with the same
    numbers and the same ``release`` is a no-op). ``release`` names what the charge pays for: a digest of everything
    the noisy statistics depend on (records, settings, seeds, noise key), so a rerun that would publish *different*
    noise under the same charge is refused. ``dp`` is forced to False when ``noise_multiplier == 0``.
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    round: int = 0
    purpose: str = "distill"
    mechanism: str = DEFAULT_MECHANISM
    dp: bool = True
    release: str | None = None

    def __post_init__(self) -> None:
        where = "privacy.accounting.Charge"
        object.__setattr__(self, "noise_multiplier", check_noise_multiplier(self.noise_multiplier, where=where))
        object.__setattr__(self, "sample_rate", check_sample_rate(self.sample_rate, where=where))
        object.__setattr__(self, "steps", check_steps(self.steps, where=where))
        if isinstance(self.round, bool) or not isinstance(self.round, int) or self.round < 0:
            raise InvalidPrivacyParameter(
                f"{where}: round", f"round={self.round!r} must be an integer >= 0", "pass the federated round number"
            )
        for name in ("purpose", "mechanism"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise InvalidPrivacyParameter(
                    f"{where}: {name}", f"{name}={value!r} must be a non-empty string", f"name the {name} of the charge"
                )
        if not isinstance(self.dp, bool):
            raise InvalidPrivacyParameter(f"{where}: dp", f"dp={self.dp!r} must be true or false", "pass a bool")
        object.__setattr__(self, "dp", self.dp and self.noise_multiplier > 0)
        if self.release is not None and (not isinstance(self.release, str) or not 0 < len(self.release) <= 128):
            raise InvalidPrivacyParameter(
                f"{where}: release", f"release={self.release!r} must be a non-empty string of at most 128 characters",
                "pass a digest of the release's inputs (or None)",
            )

    @property
    def history_tuple(self) -> tuple[float, float, int]:
        """The (noise_multiplier, sample_rate, steps) tuple Opacus accountants take in ``history``."""
        return (self.noise_multiplier, self.sample_rate, self.steps)


ChargeLike = Charge | Mapping[str, Any] | Sequence[Any]


def _as_triple(entry: ChargeLike, *, where: str) -> tuple[float, float, int, bool]:
    """(noise_multiplier, sample_rate, steps, dp) of a Charge, a ledger-entry mapping or a plain tuple."""
    if hasattr(entry, "to_charge"):  # a LedgerEntry
        entry = entry.to_charge()
    if isinstance(entry, Charge):
        return entry.noise_multiplier, entry.sample_rate, entry.steps, entry.dp
    if isinstance(entry, Mapping):
        try:
            nm, q, steps = entry["noise_multiplier"], entry["sample_rate"], entry["steps"]
        except KeyError as e:
            raise InvalidPrivacyParameter(
                where, f"charge {dict(entry)!r} lacks key {e.args[0]!r}", "give noise_multiplier, sample_rate, steps"
            ) from None
        dp = entry.get("dp", True)
    elif isinstance(entry, Sequence) and not isinstance(entry, str) and len(entry) == 3:
        nm, q, steps = entry
        dp = True
    else:
        raise InvalidPrivacyParameter(
            where,
            f"charge {entry!r} is not a Charge, a mapping or a (noise_multiplier, sample_rate, steps) tuple",
            "pass Charge objects or ledger entries",
        )
    nm = check_noise_multiplier(nm, where=where)
    q = check_sample_rate(q, where=where)
    steps = check_steps(steps, where=where)
    if not isinstance(dp, bool):
        raise InvalidPrivacyParameter(f"{where}: dp", f"dp={dp!r} must be true or false", "pass a bool")
    return nm, q, steps, dp and nm > 0


# ----------------------------------------------------------------------------------------------- accounting


def _accountant_options(accountant: str) -> dict[str, Any]:
    """Keyword arguments of the accountant's ``get_epsilon``: the RDP orders for ``rdp``, nothing for ``prv``."""
    return {"alphas": list(RDP_ORDERS)} if accountant == "rdp" else {}


@contextlib.contextmanager
def _quiet_order_search() -> Iterator[None]:
    """Silence Opacus's "optimal order is the largest alpha" while a calibration bisection tries huge noise levels
    (they spend almost nothing at any order; the warning says nothing about the sigma finally chosen)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha", category=UserWarning)
        yield


@functools.lru_cache(maxsize=512)
def _opacus_epsilon(history: tuple[tuple[float, float, int], ...], *, delta: float, accountant: str) -> float:
    """Opacus's epsilon for ``history`` (memoised: the ledger re-reads and previews the same histories)."""
    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)
    try:
        # numpy divides by zero inside PRV's domain maths when sample_rate == 1; the bound stays valid and NaN is
        # refused below. (np.errstate is thread-local, unlike warnings.catch_warnings.)
        with np.errstate(divide="ignore", invalid="ignore"):
            eps = float(acc.get_epsilon(delta=delta, **_accountant_options(accountant)))
    except (ValueError, ArithmeticError) as e:
        raise AccountingError(
            f"privacy.accounting: {accountant} accountant",
            f"failed on history {history!r} with delta={delta!r}: {e}",
            "use accountant 'rdp' or a larger noise multiplier / fewer steps",
        ) from e
    if math.isnan(eps) or eps < 0:
        raise AccountingError(
            f"privacy.accounting: {accountant} accountant",
            f"returned epsilon={eps!r} for history {history!r}",
            "use accountant 'rdp' or a larger noise multiplier / fewer steps",
        )
    return eps


def epsilon_for(entries: Iterable[ChargeLike], *, delta: float, accountant: str = "rdp") -> float:
    """Epsilon (at ``delta``) of all ``entries`` composed, by Opacus's RDP or PRV accountant.

    ``entries`` are :class:`Charge` objects, ledger-entry mappings or (noise_multiplier, sample_rate, steps) tuples.
    No entries -> 0.0; any non-DP entry -> inf.
    """
    where = "privacy.accounting.epsilon_for"
    delta = check_delta(delta, where=where)
    accountant = check_accountant(accountant, where=where)
    triples = [_as_triple(e, where=where) for e in entries]
    if any(not dp for *_, dp in triples):
        return math.inf
    if not triples:
        return 0.0
    return _opacus_epsilon(tuple((nm, q, steps) for nm, q, steps, _ in triples), delta=delta, accountant=accountant)


def _check_tolerance(epsilon_tolerance: Any, *, where: str) -> float:
    if not _is_number(epsilon_tolerance) or not math.isfinite(epsilon_tolerance) or epsilon_tolerance <= 0:
        raise InvalidPrivacyParameter(
            f"{where}: epsilon_tolerance",
            f"epsilon_tolerance={epsilon_tolerance!r} must be a finite number > 0",
            "use e.g. 0.01",
        )
    return float(epsilon_tolerance)


def calibrate_noise(
    *,
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    epsilon_tolerance: float = 0.01,
) -> float:
    """Smallest noise multiplier (to ``epsilon_tolerance``) such that ``steps`` steps at ``sample_rate`` spend at
    most ``epsilon`` at ``delta``: Opacus's ``get_noise_multiplier`` (bisection on the accountant's epsilon)."""
    where = "privacy.accounting.calibrate_noise"
    epsilon = check_epsilon(epsilon, where=where)
    delta = check_delta(delta, where=where)
    sample_rate = check_sample_rate(sample_rate, where=where)
    steps = check_steps(steps, where=where)
    accountant = check_accountant(accountant, where=where)
    epsilon_tolerance = _check_tolerance(epsilon_tolerance, where=where)
    try:
        return _opacus_noise_multiplier(epsilon, delta, sample_rate, steps, accountant, epsilon_tolerance)
    except ValueError as e:
        raise BudgetExceeded(
            where,
            f"no noise multiplier up to 1e6 reaches epsilon={epsilon} at delta={delta} for {steps} steps at "
            f"sample_rate={sample_rate} ({e})",
            "raise the budget (epsilon/delta), lower the number of steps or the sample rate",
        ) from e


@functools.lru_cache(maxsize=256)
def _opacus_noise_multiplier(epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str,
                             epsilon_tolerance: float) -> float:
    """Opacus's ``get_noise_multiplier`` (memoised: a bisection costs seconds with the fractional RDP orders, and a
    site plans the same budget again in every round, check and resume)."""
    with np.errstate(divide="ignore", invalid="ignore"), _quiet_order_search():
        return float(
            get_noise_multiplier(
                target_epsilon=epsilon,
                target_delta=delta,
                sample_rate=sample_rate,
                steps=steps,
                accountant=accountant,
                epsilon_tolerance=epsilon_tolerance,
                **_accountant_options(accountant),
            )
        )


def calibrate_round_noise(
    *,
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps_per_round: int,
    rounds: int,
    accountant: str = "rdp",
    already_spent: Iterable[ChargeLike] = (),
    epsilon_tolerance: float = 0.01,
) -> float:
    """Per-round noise multiplier for a plan of ``rounds`` x ``steps_per_round`` steps at ``sample_rate`` such that
    the ledger entries of all rounds, composed with ``already_spent`` (entries already in the ledger), spend at most
    ``epsilon`` at ``delta``.

    Starts from Opacus's calibration of ``rounds * steps_per_round`` steps (with prior entries, first from that of
    the prior and planned steps together, which is the answer when the earlier rounds ran this plan); checks the
    plan as it will be charged (one entry per round) with :func:`epsilon_for` and, when prior entries or accountant
    numerics demand it, raises sigma by bisection on that same accountant until it fits.
    """
    where = "privacy.accounting.calibrate_round_noise"
    epsilon = check_epsilon(epsilon, where=where)
    delta = check_delta(delta, where=where)
    sample_rate = check_sample_rate(sample_rate, where=where)
    steps_per_round = check_steps(steps_per_round, where=where, name="steps_per_round")
    rounds = check_steps(rounds, where=where, name="rounds")
    accountant = check_accountant(accountant, where=where)
    epsilon_tolerance = _check_tolerance(epsilon_tolerance, where=where)
    prior = list(already_spent)

    spent = epsilon_for(prior, delta=delta, accountant=accountant)
    if spent >= epsilon:
        raise BudgetExceeded(
            where,
            f"the ledger has already spent epsilon={spent:.6g} of the budget {epsilon:.6g}; nothing is left for "
            f"{rounds} more round(s)",
            "raise the budget (epsilon) or start a new ledger for a new consortium run",
        )

    def plan_epsilon(sigma: float) -> float:
        plan = [(sigma, sample_rate, steps_per_round)] * rounds
        with _quiet_order_search():
            return epsilon_for([*prior, *plan], delta=delta, accountant=accountant)

    def calibrated(steps: int) -> float | None:
        try:
            return calibrate_noise(epsilon=epsilon, delta=delta, sample_rate=sample_rate, steps=steps,
                                   accountant=accountant, epsilon_tolerance=epsilon_tolerance)
        except BudgetExceeded:
            return None

    # With prior entries, first try the noise of one fresh plan that also covers the prior steps: exact when the
    # earlier rounds ran this same plan (a later round of it; memoised since that round), so no bisection is needed.
    guess = eps_guess = None
    if prior:
        guess = calibrated(rounds * steps_per_round + sum(_as_triple(e, where=where)[2] for e in prior))
        if guess is not None:
            eps_guess = plan_epsilon(guess)
            if 0 <= epsilon - eps_guess <= epsilon_tolerance:
                return guess
    sigma_high = calibrated(rounds * steps_per_round)
    if sigma_high is None:
        raise BudgetExceeded(
            where,
            f"no noise multiplier up to 1e6 reaches epsilon={epsilon} at delta={delta} for {rounds} x "
            f"{steps_per_round} steps at sample_rate={sample_rate}",
            "raise the budget (epsilon/delta), lower rounds, steps or the sample rate",
        )
    eps_high = plan_epsilon(sigma_high)
    if eps_high <= epsilon:
        return sigma_high
    sigma_low = sigma_high  # prior spending only adds epsilon: more noise is needed, never less
    if guess is not None and guess > sigma_low:  # the guess brackets the answer from one side or the other
        if eps_guess <= epsilon:
            sigma_high, eps_high = guess, eps_guess
        else:
            sigma_low = sigma_high = guess
    while eps_high > epsilon:
        sigma_high *= 2
        if sigma_high > 1e6:
            raise BudgetExceeded(
                where,
                f"no noise multiplier up to 1e6 fits {rounds} x {steps_per_round} steps into the remaining budget "
                f"(spent {spent:.6g} of {epsilon:.6g})",
                "raise the budget (epsilon/delta), lower rounds, steps or the sample rate",
            )
        eps_high = plan_epsilon(sigma_high)
    while epsilon - eps_high > epsilon_tolerance and sigma_high - sigma_low > 1e-6 * sigma_high:
        sigma = (sigma_low + sigma_high) / 2
        eps = plan_epsilon(sigma)
        if eps <= epsilon:
            sigma_high, eps_high = sigma, eps
        else:
            sigma_low = sigma
    return sigma_high
