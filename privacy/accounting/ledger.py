"""A site's privacy ledger, ``privacy_ledger.json``: write-ahead, atomic, recomputed by the accountant.

Design invariants 3 and 4: a release is refused when it would take the site over its (epsilon, delta) budget, and
the charge is on disk *before* :meth:`PrivacyLedger.charge` returns (temp file in the same folder, flush + fsync,
``os.replace``, fsync of the folder), so a crash may over-count but never under-count. ``epsilon_spent`` is always
recomputed from every entry by the Opacus accountant (RDP: Mironov 2017; PRV: Gopi et al. 2021), never summed.

File format (JSON, never ``NaN``/``Infinity``; an infinite epsilon is written as the string ``"inf"``)::

    {
      "format_version": 1,
      "site_id": "hospital-a",
      "budget": {"epsilon": 1.0 | "inf", "delta": 1e-05, "accountant": "rdp" | "prv"},
      "entries": [
        {"mechanism": "poisson_subsampled_gaussian", "noise_multiplier": 1.1, "sample_rate": 0.01, "steps": 500,
         "round": 1, "purpose": "distill", "time": "2025-01-01T12:00:00.000+00:00", "dp": true,
         "status": "charged", "release": "9f2c..."}
      ],
      "epsilon_spent": 0.83 | "inf"
    }

``release`` (optional) is the digest of what the charge paid for: one charge buys one release, so a (round, purpose)
charged again with the same numbers but another release is a :class:`ChargeConflict`, not a free second release.
``budget.epsilon == "inf"`` is the ``--no-dp`` ledger: only it accepts non-DP charges (``dp: false``), which make
``epsilon_spent`` ``"inf"``. A missing, truncated or inconsistent file is a typed error, never a reset to zero:
:meth:`PrivacyLedger.open` creates an empty ledger only where no trace of an earlier charge is found
(:class:`LedgerMissing`; DESIGN invariant 9).
Concurrent writers are serialised by an advisory lock on ``privacy_ledger.json.lock`` next to the ledger.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from medfdd.io import atomic_write_bytes

from .accountant import (
    BudgetExceeded,
    Charge,
    InvalidPrivacyParameter,
    PrivacyError,
    check_accountant,
    check_delta,
    check_epsilon,
    check_unit,
    epsilon_for,
)

LEDGER_FILENAME = "privacy_ledger.json"
# what a site charges for: one vocabulary for the site runner that charges and the audit that replays the charges
PURPOSE_DISTILL = "distill"  # one distillation round (its paid steps)
PURPOSE_FINETUNE = "finetune"  # one hybrid-mode DP fine-tuning round
PURPOSE_RECORD_COUNT = "record-count"  # the DP record count the sample rate is derived from
RECORD_COUNT_ROUND = 1  # the record count is paid once, before the first distillation, whatever round asks first
FORMAT_VERSION = 1
BUDGET_RTOL = 1e-9  # a charge may exceed the budget by this relative amount (float noise), no more
STORED_EPSILON_RTOL = 1e-3  # stored epsilon_spent above the recomputed one by more than this -> entries went missing

__all__ = [
    "BUDGET_RTOL",
    "LEDGER_FILENAME",
    "Budget",
    "ChargeConflict",
    "LedgerCorrupt",
    "LedgerEntry",
    "LedgerMismatch",
    "LedgerMissing",
    "LedgerWriteError",
    "PrivacyLedger",
    "check_not_lost",
]


class LedgerCorrupt(PrivacyError):
    """privacy_ledger.json is missing, unreadable, truncated or inconsistent; it is never silently reset."""


class LedgerMissing(LedgerCorrupt):
    """privacy_ledger.json is missing although files next to it show earlier charges or releases: a lost ledger is
    never a fresh budget (an empty one would let the site spend its epsilon again)."""


class LedgerMismatch(PrivacyError):
    """The ledger on disk belongs to another site or budget than the config asks for."""


class ChargeConflict(PrivacyError):
    """A charge reuses a (round, purpose) key already charged with different numbers or for another release."""


class LedgerWriteError(PrivacyError):
    """Writing the ledger failed: the charge must be treated as not granted (release nothing)."""


@dataclass(frozen=True)
class Budget:
    """A site's total (epsilon, delta) budget and the accountant that measures spending against it."""

    epsilon: float
    delta: float
    accountant: str
    unit: str = "scan"  # what epsilon protects: one scan, or one patient (one scan per patient); see PRIVACY_UNITS

    @property
    def dp(self) -> bool:
        """False for the --no-dp ledger (epsilon = inf)."""
        return math.isfinite(self.epsilon)

    def to_json(self) -> dict[str, Any]:
        return {"epsilon": _num_out(self.epsilon), "delta": self.delta, "accountant": self.accountant,
                "unit": self.unit}


@dataclass(frozen=True)
class LedgerEntry:
    """One recorded charge (``status`` is always ``"charged"``: entries are written before the release)."""

    mechanism: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    round: int
    purpose: str
    time: str
    dp: bool
    status: str = "charged"
    release: str | None = None

    @classmethod
    def from_charge(cls, charge: Charge, *, time: str) -> LedgerEntry:
        return cls(**asdict(charge), time=time)

    def to_charge(self) -> Charge:
        return Charge(**{f.name: getattr(self, f.name) for f in fields(Charge)})

    def key(self) -> tuple[int, str]:
        return (self.round, self.purpose)

    def same_numbers(self, charge: Charge) -> bool:
        return (
            self.mechanism == charge.mechanism
            and self.noise_multiplier == charge.noise_multiplier
            and self.sample_rate == charge.sample_rate
            and self.steps == charge.steps
            and self.dp == charge.dp
        )

    def same_release(self, charge: Charge) -> bool:
        """The same numbers paying for the same release: a resumed or replayed run, not a new release."""
        return self.same_numbers(charge) and self.release == charge.release

    def to_json(self) -> dict[str, Any]:
        return {
            "mechanism": self.mechanism,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": self.steps,
            "round": self.round,
            "purpose": self.purpose,
            "time": self.time,
            "dp": self.dp,
            "status": self.status,
            **({"release": self.release} if self.release is not None else {}),
        }


# ----------------------------------------------------------------------------------------------- (de)serialising


def _num_out(x: float) -> float | str:
    if math.isnan(x):  # never reachable through the public API; refuse rather than write garbage
        raise ValueError("NaN cannot be written to the privacy ledger")
    return "inf" if math.isinf(x) else float(x)


def _corrupt(path: Path, problem: str) -> LedgerCorrupt:
    return LedgerCorrupt(
        str(path),
        problem,
        "restore the ledger from a backup or the run's copy; do not delete it (that would reset the spent budget "
        "to zero and under-count). Start a new output directory only with the consortium's agreement",
    )


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-JSON number {name}")


def _num_in(value: Any, *, path: Path, field: str, allow_inf: bool) -> float:
    if allow_inf and value == "inf":
        return math.inf
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        expected = 'a number or "inf"' if allow_inf else "a finite number"
        raise _corrupt(path, f"{field}={value!r} is not {expected}")
    return float(value)


def _expect_keys(obj: Any, keys: set[str], *, path: Path, what: str, optional: frozenset[str] = frozenset()) -> None:
    if not isinstance(obj, dict):
        raise _corrupt(path, f"{what} is {type(obj).__name__}, not a JSON object")
    missing = keys - obj.keys()
    unknown = obj.keys() - keys - optional
    if missing:
        raise _corrupt(path, f"{what} lacks key(s) {sorted(missing)} (truncated or not a privacy ledger?)")
    if unknown:
        raise _corrupt(path, f"{what} has unknown key(s) {sorted(unknown)}")


_ENTRY_KEYS = {"mechanism", "noise_multiplier", "sample_rate", "steps", "round", "purpose", "time", "dp", "status"}


def _parse_entry(raw: Any, *, path: Path, i: int) -> LedgerEntry:
    what = f"entries[{i}]"
    _expect_keys(raw, _ENTRY_KEYS, path=path, what=what, optional=frozenset({"release"}))
    if raw["status"] != "charged":
        raise _corrupt(path, f'{what}.status={raw["status"]!r} is not "charged"')
    if not isinstance(raw["time"], str):
        raise _corrupt(path, f"{what}.time={raw['time']!r} is not a string")
    try:
        charge = Charge(
            noise_multiplier=raw["noise_multiplier"],
            sample_rate=raw["sample_rate"],
            steps=raw["steps"],
            round=raw["round"],
            purpose=raw["purpose"],
            mechanism=raw["mechanism"],
            dp=raw["dp"],
            release=raw.get("release"),
        )
    except InvalidPrivacyParameter as e:
        raise _corrupt(path, f"{what}: {e.problem}") from None
    if raw["dp"] != charge.dp:
        raise _corrupt(path, f"{what}: dp=true with noise_multiplier=0 is inconsistent")
    return LedgerEntry.from_charge(charge, time=raw["time"])


@dataclass(frozen=True)
class _State:
    site_id: str
    budget: Budget
    entries: tuple[LedgerEntry, ...]
    epsilon_spent: float


def _read_state(path: Path) -> _State:
    """Parse and check privacy_ledger.json; epsilon_spent is recomputed from the entries."""
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise _corrupt(path, "the ledger file is missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise _corrupt(path, f"cannot be read as UTF-8 text ({e})") from None
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except ValueError as e:  # JSONDecodeError is a ValueError; so is NaN/Infinity
        raise _corrupt(path, f"is not valid JSON ({e}); the file is truncated or damaged") from None
    _expect_keys(
        doc,
        {"site_id", "budget", "entries", "epsilon_spent"},
        path=path,
        what="the ledger",
        optional=frozenset({"format_version"}),
    )
    if doc.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
        raise _corrupt(path, f"format_version={doc['format_version']!r} is not {FORMAT_VERSION}")
    if not isinstance(doc["site_id"], str) or not doc["site_id"]:
        raise _corrupt(path, f"site_id={doc['site_id']!r} is not a non-empty string")
    _expect_keys(doc["budget"], {"epsilon", "delta", "accountant"}, path=path, what="budget",
                 optional=frozenset({"unit"}))  # ledgers written before privacy units protect scans
    raw_budget = doc["budget"]
    try:
        budget = Budget(
            epsilon=check_epsilon(
                _num_in(raw_budget["epsilon"], path=path, field="budget.epsilon", allow_inf=True),
                where="budget",
                allow_inf=True,
            ),
            delta=check_delta(raw_budget["delta"], where="budget"),
            accountant=check_accountant(raw_budget["accountant"], where="budget"),
            unit=check_unit(raw_budget.get("unit", "scan"), where="budget"),
        )
    except InvalidPrivacyParameter as e:
        raise _corrupt(path, f"budget: {e.problem}") from None
    if not isinstance(doc["entries"], list):
        raise _corrupt(path, "entries is not a list")
    entries = tuple(_parse_entry(raw, path=path, i=i) for i, raw in enumerate(doc["entries"]))
    keys = [e.key() for e in entries]
    if len(set(keys)) != len(keys):
        raise _corrupt(path, "two entries share the same (round, purpose)")
    if budget.dp and any(not e.dp for e in entries):
        raise _corrupt(path, "a non-DP entry sits in a ledger with a finite epsilon budget")
    stored = _num_in(doc["epsilon_spent"], path=path, field="epsilon_spent", allow_inf=True)
    if stored < 0:
        raise _corrupt(path, f"epsilon_spent={stored!r} is negative")
    spent = epsilon_for([e.to_charge() for e in entries], delta=budget.delta, accountant=budget.accountant)
    if math.isinf(stored) != math.isinf(spent) or (
        math.isfinite(stored) and stored > spent * (1 + STORED_EPSILON_RTOL) + 1e-9
    ):
        raise _corrupt(
            path,
            f"stored epsilon_spent={stored!r} does not match {spent!r} recomputed from the entries "
            "(entries may have been removed or edited)",
        )
    return _State(site_id=doc["site_id"], budget=budget, entries=entries, epsilon_spent=spent)


def _render(state: _State) -> bytes:
    doc = {
        "format_version": FORMAT_VERSION,
        "site_id": state.site_id,
        "budget": state.budget.to_json(),
        "entries": [e.to_json() for e in state.entries],
        "epsilon_spent": _num_out(state.epsilon_spent),
    }
    return (json.dumps(doc, indent=2, allow_nan=False) + "\n").encode("utf-8")


def _atomic_write(path: Path, data: bytes) -> None:
    """medfdd's atomic write: temp file ``.privacy_ledger.json.*.tmp`` in the same folder, flush + fsync,
    ``os.replace`` onto the ledger, fsync the folder. On failure the temp file is removed and the old ledger stays."""
    atomic_write_bytes(path, data)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive advisory lock (flock) on ``<ledger>.lock``: one read-check-write at a time across processes."""
    lock_path = path.with_name(path.name + ".lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _resolve(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    return p if p.suffix == ".json" else p / LEDGER_FILENAME


def check_not_lost(path: str | os.PathLike[str], traces: Iterable[str | os.PathLike[str]]) -> None:
    """Raise :class:`LedgerMissing` when the ledger at ``path`` is missing but any of ``traces`` exists: files that
    are only ever written after a charge was (released artifacts, checkpoints, a paid record count). A lost ledger is
    never a fresh budget (DESIGN invariant 9)."""
    file = _resolve(path)
    if file.exists():
        return
    found = sorted(Path(t) for t in traces if Path(t).exists())
    if found:
        names = [str(t.relative_to(file.parent)) if t.is_relative_to(file.parent) else str(t) for t in found]
        shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        raise LedgerMissing(
            str(file),
            f"the privacy ledger is missing, but its folder holds traces of earlier charges or releases ({shown}); "
            "a new, empty ledger would count the budget from zero and pay for every round again",
            f"restore {file.name} from the site's backup into {file.parent} (the ledger, not a new one, is the record "
            "of what was spent; deleting the traces does not give the budget back); for a genuinely new site or a "
            "newly agreed budget, point the site config's output at a new, empty folder",
        )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


# ----------------------------------------------------------------------------------------------- the ledger


class PrivacyLedger:
    """One site's privacy ledger. Create or load it with :meth:`open`; spend with :meth:`charge`.

    Release data only after :meth:`charge` has returned: the entry is then durable on disk.
    """

    def __init__(self, path: Path, state: _State):  # use PrivacyLedger.open / PrivacyLedger.load
        self._path = path
        self._state = state

    # -- construction -----------------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        site_id: str,
        epsilon: float,
        delta: float,
        accountant: str = "rdp",
        unit: str = "scan",
        traces: Iterable[str | os.PathLike[str]] = (),
    ) -> PrivacyLedger:
        """Load the ledger at ``path`` (a ``.json`` file, or a folder holding ``privacy_ledger.json``), or create an
        empty one (written to disk at once). ``epsilon=math.inf`` is the --no-dp ledger. ``traces``: files that exist
        only after a charge; an empty ledger is never created next to one of them (:func:`check_not_lost`).

        Raises :class:`LedgerMismatch` when the file exists for another site or budget, :class:`LedgerCorrupt`
        when it cannot be trusted, :class:`LedgerMissing` when it is missing but ``traces`` show it existed,
        :class:`InvalidPrivacyParameter` for a bad budget.
        """
        where = "PrivacyLedger.open"
        budget = Budget(
            epsilon=check_epsilon(epsilon, where=where, allow_inf=True),
            delta=check_delta(delta, where=where),
            accountant=check_accountant(accountant, where=where),
            unit=check_unit(unit, where=where),
        )
        if not isinstance(site_id, str) or not site_id:
            raise InvalidPrivacyParameter(
                f"{where}: site_id", f"site_id={site_id!r} must be a non-empty string", "pass the config's site_id"
            )
        file = _resolve(path)
        file.parent.mkdir(parents=True, exist_ok=True)
        with _locked(file):
            if file.exists():
                state = _read_state(file)
                cls._check_matches(file, state, site_id=site_id, budget=budget)
            else:
                check_not_lost(file, traces)
                state = _State(site_id=site_id, budget=budget, entries=(), epsilon_spent=0.0)
                try:
                    _atomic_write(file, _render(state))
                except OSError as e:
                    raise LedgerWriteError(
                        str(file), f"cannot create the ledger ({e})", "check the output folder is writable"
                    ) from e
        return cls(file, state)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PrivacyLedger:
        """Load an existing ledger without a config to compare with (reports, audits, crash checks)."""
        file = _resolve(path)
        return cls(file, _read_state(file))

    @staticmethod
    def _check_matches(file: Path, state: _State, *, site_id: str, budget: Budget) -> None:
        if state.site_id != site_id:
            raise LedgerMismatch(
                str(file),
                f"the ledger belongs to site {state.site_id!r}, not {site_id!r}",
                "point the site's output at its own folder",
            )
        if state.budget != budget:
            raise LedgerMismatch(
                str(file),
                f"the ledger's budget {state.budget.to_json()} differs from the config's {budget.to_json()}",
                "restore the original privacy settings in the site config; a budget cannot be changed once spending "
                "has started (use a new output folder for a new, separately agreed budget)",
            )

    # -- reading --------------------------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    @property
    def site_id(self) -> str:
        return self._state.site_id

    @property
    def budget(self) -> Budget:
        return self._state.budget

    @property
    def entries(self) -> tuple[LedgerEntry, ...]:
        return self._state.entries

    @property
    def epsilon_spent(self) -> float:
        """Epsilon of all entries composed, recomputed by the accountant (inf after a non-DP charge)."""
        return self._state.epsilon_spent

    @property
    def remaining(self) -> float:
        """Budget epsilon minus epsilon spent, floored at 0 (inf for the --no-dp ledger). Note that epsilons
        compose sub-additively under RDP/PRV, so a charge worth ``remaining`` on its own may still fit."""
        if math.isinf(self.budget.epsilon):
            return math.inf
        return max(0.0, self.budget.epsilon - self.epsilon_spent)

    def find_charge(self, round: int, purpose: str) -> LedgerEntry | None:
        """The entry charged under (round, purpose), if any."""
        for entry in self._state.entries:
            if entry.key() == (round, purpose):
                return entry
        return None

    def preview(self, charge: Charge) -> float:
        """Epsilon spent if ``charge`` were added (the current value when the same charge is already recorded)."""
        charge = self._check_charge(charge)
        existing = self.find_charge(charge.round, charge.purpose)
        if existing is not None and existing.same_release(charge):
            return self.epsilon_spent
        return self._epsilon_with(self._state.entries, charge)

    def to_json(self) -> dict[str, Any]:
        return json.loads(_render(self._state))

    # -- spending -------------------------------------------------------------------------------------------------

    def charge(self, charge: Charge) -> float:
        """Record ``charge`` durably and return the new epsilon spent. Write-ahead: the budget check happens before
        the file is touched, and the file is fsynced and atomically replaced before this returns.

        Idempotent per (round, purpose): the same key with identical numbers and release returns without a second
        entry; with different numbers or another release it raises :class:`ChargeConflict`. Raises :class:`BudgetExceeded` (file untouched) when
        the charge would exceed the budget, and :class:`LedgerWriteError` when the write failed (release nothing).
        """
        charge = self._check_charge(charge)
        with _locked(self._path):
            # Re-read under the lock: another process may have charged since we loaded, or the file may be damaged.
            state = _read_state(self._path)
            self._check_matches(self._path, state, site_id=self.site_id, budget=self.budget)
            self._state = state
            existing = self.find_charge(charge.round, charge.purpose)
            if existing is not None:
                if existing.same_release(charge):
                    return state.epsilon_spent
                if existing.same_numbers(charge):
                    raise ChargeConflict(
                        str(self._path),
                        f"round {charge.round} purpose {charge.purpose!r} was already charged for release "
                        f"{existing.release!r}; this run would publish another one ({charge.release!r}: different "
                        "records, labels, settings, seed, device, precision, global model or noise key) under the "
                        "same charge, unaccounted",
                        "rerun with exactly the inputs of the first release (restore the data, config and the site's "
                        "noise_key), or release the change as the next planned round (--round)",
                    )
                raise ChargeConflict(
                    str(self._path),
                    f"round {charge.round} purpose {charge.purpose!r} was already charged as {existing.to_json()}, "
                    f"now asked with noise_multiplier={charge.noise_multiplier}, sample_rate={charge.sample_rate}, "
                    f"steps={charge.steps}, mechanism={charge.mechanism!r}, dp={charge.dp}",
                    "resume with the originally planned numbers, or use a new purpose/round for a new release",
                )
            budget = state.budget
            if not charge.dp and budget.dp:
                raise BudgetExceeded(
                    str(self._path),
                    f"a non-DP charge (noise_multiplier={charge.noise_multiplier}, dp=false) makes epsilon inf, "
                    f"but this ledger's budget is epsilon={budget.epsilon}",
                    "run DP (noise_multiplier > 0), or run the --no-dp baseline (privacy.dp: false) in its own output "
                    "folder, whose ledger has epsilon = inf",
                )
            new_spent = self._epsilon_with(state.entries, charge)
            if new_spent > budget.epsilon * (1 + BUDGET_RTOL):
                raise BudgetExceeded(
                    str(self._path),
                    f"epsilon spent {state.epsilon_spent:.6g} would become {new_spent:.6g} after this charge "
                    f"(round {charge.round}, {charge.purpose!r}: noise_multiplier={charge.noise_multiplier:.6g}, "
                    f"sample_rate={charge.sample_rate:.6g}, steps={charge.steps}), over the budget "
                    f"epsilon={budget.epsilon:.6g} at delta={budget.delta:g} ({budget.accountant})",
                    "lower the steps (iterations) or the sample rate, raise the noise multiplier (recalibrate with "
                    "calibrate_round_noise for the remaining budget), or agree a larger budget",
                )
            entry = LedgerEntry.from_charge(charge, time=_now())
            new_state = _State(
                site_id=state.site_id, budget=budget, entries=(*state.entries, entry), epsilon_spent=new_spent
            )
            try:
                _atomic_write(self._path, _render(new_state))
            except OSError as e:
                raise LedgerWriteError(
                    str(self._path),
                    f"the charge could not be written ({e}); it is not granted",
                    "release nothing; fix the disk problem and run again (the resumed run re-charges this round)",
                ) from e
            self._state = new_state
            return new_spent

    def _check_charge(self, charge: Any) -> Charge:
        if not isinstance(charge, Charge):
            raise InvalidPrivacyParameter(
                "PrivacyLedger.charge",
                f"{charge!r} is not a privacy.accounting.Charge",
                "build Charge(noise_multiplier=..., sample_rate=..., steps=..., round=..., purpose=...)",
            )
        return charge

    def _epsilon_with(self, entries: tuple[LedgerEntry, ...], charge: Charge) -> float:
        return epsilon_for(
            [*(e.to_charge() for e in entries), charge], delta=self.budget.delta, accountant=self.budget.accountant
        )

    def __repr__(self) -> str:
        return (
            f"PrivacyLedger({str(self._path)!r}, site_id={self.site_id!r}, epsilon_spent={self.epsilon_spent:.6g}, "
            f"budget={self.budget.to_json()}, entries={len(self.entries)})"
        )
