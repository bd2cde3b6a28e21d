"""privacy.accounting: Opacus accountant wrapper, calibration, and the write-ahead site ledger (invariants 3 and 4).

Epsilons are cross-checked against Google's independent ``dp_accounting`` library (RDP and PLD accountants).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import dp_accounting
import pytest
from dp_accounting import pld, rdp
from hypothesis import given, settings
from hypothesis import strategies as st

import privacy.accounting.ledger as ledger_mod
from medfdd.errors import MedfddError
from privacy.accounting import (
    LEDGER_FILENAME,
    BudgetExceeded,
    Charge,
    ChargeConflict,
    InvalidPrivacyParameter,
    LedgerCorrupt,
    LedgerMismatch,
    LedgerWriteError,
    PrivacyLedger,
    calibrate_noise,
    calibrate_round_noise,
    epsilon_for,
)

REPO = Path(__file__).resolve().parents[2]
DELTA = 1e-5


def _dp_event(entries):
    events = [
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
        )
        for sigma, q, steps in entries
    ]
    return events[0] if len(events) == 1 else dp_accounting.ComposedDpEvent(events)


def reference_rdp(entries, delta=DELTA):
    acc = rdp.RdpAccountant()
    acc.compose(_dp_event(entries))
    return acc.get_epsilon(delta)


def reference_pld(entries, delta=DELTA):
    acc = pld.PLDAccountant()
    acc.compose(_dp_event(entries))
    return acc.get_epsilon(delta)


def rel(a, b):
    return abs(a - b) / abs(b)


def open_ledger(tmp_path, epsilon=1.0, accountant="rdp", **kw):
    return PrivacyLedger.open(tmp_path, site_id="hospital-a", epsilon=epsilon, delta=DELTA, accountant=accountant, **kw)


# ----------------------------------------------------------------------------------------------- (a) cross-checks

RDP_CASES = [
    [(1.0, 0.01, 1000)],
    [(0.8, 0.001, 10000)],
    [(2.0, 0.1, 100)],
    [(5.0, 1.0, 10)],
    [(1.5, 0.05, 500)],
    [(1.0, 0.01, 300), (1.5, 0.02, 200), (0.9, 0.005, 1000)],
    [(1.1, 0.01, 250)] * 4,
    [(0.909, 0.105, 100)],  # epsilon ~10 at a large site's sample rate (B1 federated, batch 128/class)
    [(5.0, 0.01, 10)],  # small budgets (epsilon < ~0.2 at delta 1e-5): the best Renyi order is above 63
    [(3.0, 0.05, 20)],
]


@pytest.mark.parametrize("entries", RDP_CASES)
def test_rdp_epsilon_matches_dp_accounting(entries, tmp_path):
    ours = epsilon_for(entries, delta=DELTA, accountant="rdp")
    ref = reference_rdp(entries)
    assert rel(ours, ref) < 0.01, (ours, ref)
    ledger = open_ledger(tmp_path, epsilon=math.inf)
    for i, (sigma, q, steps) in enumerate(entries):
        ledger.charge(Charge(noise_multiplier=sigma, sample_rate=q, steps=steps, round=i))
    assert rel(ledger.epsilon_spent, ref) < 0.01
    assert rel(PrivacyLedger.load(tmp_path).epsilon_spent, ref) < 0.01


PRV_CASES = [
    [(1.0, 0.01, 1000)],
    [(1.5, 0.05, 100)],
    [(1.0, 0.01, 200), (1.2, 0.02, 100)],
]


@pytest.mark.parametrize("entries", PRV_CASES)
def test_prv_epsilon_matches_dp_accounting_pld(entries, tmp_path):
    ours = epsilon_for(entries, delta=DELTA, accountant="prv")
    ref = reference_pld(entries)
    assert rel(ours, ref) < 0.05, (ours, ref)
    ledger = open_ledger(tmp_path, epsilon=math.inf, accountant="prv")
    for i, (sigma, q, steps) in enumerate(entries):
        ledger.charge(Charge(noise_multiplier=sigma, sample_rate=q, steps=steps, round=i))
    assert ledger.epsilon_spent == pytest.approx(ours, rel=1e-9)


def test_epsilon_for_input_forms_and_special_cases():
    as_tuple = epsilon_for([(1.0, 0.01, 100)], delta=DELTA)
    as_charge = epsilon_for([Charge(noise_multiplier=1.0, sample_rate=0.01, steps=100)], delta=DELTA)
    as_mapping = epsilon_for([{"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 100, "dp": True}], delta=DELTA)
    assert as_tuple == as_charge == as_mapping > 0
    assert epsilon_for([], delta=DELTA) == 0.0
    assert epsilon_for([], delta=DELTA, accountant="prv") == 0.0
    assert epsilon_for([(0.0, 0.01, 100)], delta=DELTA) == math.inf
    assert (
        epsilon_for(
            [(1.0, 0.01, 100), {"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 1, "dp": False}], delta=DELTA
        )
        == math.inf
    )
    assert epsilon_for([(0.0, 0.5, 3)], delta=DELTA, accountant="prv") == math.inf


BAD_CALLS = [
    ("delta", dict(delta=0.0)),
    ("delta", dict(delta=1.0)),
    ("delta", dict(delta=float("nan"))),
    ("sample_rate", dict(sample_rate=0.0)),
    ("sample_rate", dict(sample_rate=1.5)),
    ("steps", dict(steps=0)),
    ("steps", dict(steps=2.5)),
    ("epsilon", dict(epsilon=0.0)),
    ("epsilon", dict(epsilon=-1.0)),
    ("epsilon", dict(epsilon=math.inf)),
    ("accountant", dict(accountant="moments")),
]


@pytest.mark.parametrize(("name", "bad"), BAD_CALLS)
def test_invalid_privacy_numbers_are_typed_errors(name, bad):
    args = dict(epsilon=1.0, delta=DELTA, sample_rate=0.01, steps=100, accountant="rdp") | bad
    with pytest.raises(InvalidPrivacyParameter) as err:
        calibrate_noise(**args)
    assert isinstance(err.value, MedfddError)
    assert name in err.value.where and repr(bad[name]) in err.value.problem and err.value.fix
    if name != "epsilon":
        with pytest.raises(InvalidPrivacyParameter):
            epsilon_for([(1.0, args["sample_rate"], args["steps"])], delta=args["delta"], accountant=args["accountant"])


def test_keyword_only_privacy_numbers():
    with pytest.raises(TypeError):
        calibrate_noise(1.0, 1e-5, 0.01, 100)  # type: ignore[misc]
    with pytest.raises(TypeError):
        epsilon_for([(1.0, 0.01, 10)], 1e-5)  # type: ignore[misc]


@pytest.mark.parametrize(
    "bad",
    [dict(noise_multiplier=-1.0), dict(noise_multiplier=math.inf), dict(round=-1), dict(purpose=""), dict(steps=True)],
)
def test_invalid_charge_is_typed_error(bad):
    with pytest.raises(InvalidPrivacyParameter):
        Charge(**(dict(noise_multiplier=1.0, sample_rate=0.01, steps=10) | bad))


# ----------------------------------------------------------------------------------------------- (b) calibration


@pytest.mark.parametrize(("epsilon", "q", "steps"), [(1.0, 0.01, 1000), (8.0, 0.1, 200), (0.5, 0.004, 3000)])
def test_calibrate_then_reaccount_is_within_budget_and_close(epsilon, q, steps):
    sigma = calibrate_noise(epsilon=epsilon, delta=DELTA, sample_rate=q, steps=steps)
    eps = epsilon_for([(sigma, q, steps)], delta=DELTA)
    assert eps <= epsilon
    assert eps >= epsilon - 0.011
    assert rel(reference_rdp([(sigma, q, steps)]), epsilon) < 0.02


@pytest.mark.parametrize("rounds", [1, 3])
def test_small_budgets_calibrate_quietly_and_match_dp_accounting(rounds):
    # epsilon 0.1 at delta 1e-5 needs Renyi orders above 63 (Opacus's default range stops there and refused it);
    # the bisection's huge trial sigmas must not print Opacus's "optimal order is the largest alpha" warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sigma = calibrate_round_noise(epsilon=0.1, delta=DELTA, sample_rate=0.001, steps_per_round=10, rounds=rounds)
    plan = [(sigma, 0.001, 10)] * rounds
    eps = epsilon_for(plan, delta=DELTA)
    assert 0.1 - 0.011 <= eps <= 0.1
    assert rel(eps, reference_rdp(plan)) < 0.01


def test_calibrate_prv_small():
    sigma = calibrate_noise(
        epsilon=2.0, delta=DELTA, sample_rate=0.05, steps=100, accountant="prv", epsilon_tolerance=0.05
    )
    eps = epsilon_for([(sigma, 0.05, 100)], delta=DELTA, accountant="prv")
    assert 2.0 - 0.051 <= eps <= 2.0


def test_calibrate_impossible_budget_is_budget_exceeded():
    with pytest.raises(BudgetExceeded):
        calibrate_noise(epsilon=1e-9, delta=1e-12, sample_rate=1.0, steps=10_000)


def test_round_plan_fits_the_budget_when_charged_to_a_ledger(tmp_path):
    rounds, steps, q, budget = 4, 250, 0.01, 1.0
    sigma = calibrate_round_noise(epsilon=budget, delta=DELTA, sample_rate=q, steps_per_round=steps, rounds=rounds)
    plan_eps = epsilon_for([(sigma, q, steps)] * rounds, delta=DELTA)
    assert budget - 0.011 <= plan_eps <= budget
    ledger = open_ledger(tmp_path, epsilon=budget)
    for r in range(1, rounds + 1):
        ledger.charge(Charge(noise_multiplier=sigma, sample_rate=q, steps=steps, round=r))
    assert ledger.epsilon_spent == pytest.approx(plan_eps, rel=1e-12)
    assert rel(reference_rdp([(sigma, q, steps)] * rounds), ledger.epsilon_spent) < 0.01
    with pytest.raises(BudgetExceeded):
        ledger.charge(Charge(noise_multiplier=sigma, sample_rate=q, steps=steps, round=rounds + 1))


def test_round_plan_accounts_for_what_was_already_spent():
    prior = [(2.0, 0.01, 500)]
    spent = epsilon_for(prior, delta=DELTA)
    sigma_fresh = calibrate_round_noise(epsilon=1.5, delta=DELTA, sample_rate=0.01, steps_per_round=200, rounds=3)
    sigma = calibrate_round_noise(
        epsilon=1.5, delta=DELTA, sample_rate=0.01, steps_per_round=200, rounds=3, already_spent=prior
    )
    total = epsilon_for([*prior, *[(sigma, 0.01, 200)] * 3], delta=DELTA)
    assert 0 < spent < 1.5 and sigma > sigma_fresh
    assert 1.5 - 0.011 <= total <= 1.5
    with pytest.raises(BudgetExceeded):
        calibrate_round_noise(
            epsilon=spent * 0.9, delta=DELTA, sample_rate=0.01, steps_per_round=10, rounds=1, already_spent=prior
        )


def test_later_rounds_of_the_same_plan_keep_the_first_rounds_noise():
    # Each round re-plans from the ledger; when the earlier rounds ran this plan, the answer is the plan's own sigma
    # (found without a second bisection), and the rounds together spend the budget to within the tolerance.
    q, steps, budget = 0.02, 40, 1.0
    sigma = calibrate_round_noise(epsilon=budget, delta=DELTA, sample_rate=q, steps_per_round=steps, rounds=3)
    paid = [(sigma, q, steps)]
    for remaining in (2, 1):
        assert calibrate_round_noise(epsilon=budget, delta=DELTA, sample_rate=q, steps_per_round=steps,
                                     rounds=remaining, already_spent=paid) == sigma
        paid.append((sigma, q, steps))
    assert budget - 0.011 <= epsilon_for(paid, delta=DELTA) <= budget
    # a later round planned with fewer steps than round 1 (its plan changed): the first guess overshoots, the
    # bisection still lands within the tolerance
    sigma2 = calibrate_round_noise(epsilon=budget, delta=DELTA, sample_rate=q, steps_per_round=10, rounds=2,
                                   already_spent=paid[:1])
    assert budget - 0.011 <= epsilon_for([*paid[:1], (sigma2, q, 10), (sigma2, q, 10)], delta=DELTA) <= budget


# ----------------------------------------------------------------------------------------------- (c) write-ahead


def test_charge_is_on_disk_before_it_returns(tmp_path):
    ledger = open_ledger(tmp_path)
    file = tmp_path / LEDGER_FILENAME
    assert file.exists() and json.loads(file.read_text())["entries"] == []
    eps = ledger.charge(Charge(noise_multiplier=2.0, sample_rate=0.01, steps=100, round=1, purpose="distill"))
    doc = json.loads(file.read_text())
    assert [(e["round"], e["purpose"], e["steps"], e["status"], e["dp"]) for e in doc["entries"]] == [
        (1, "distill", 100, "charged", True)
    ]
    assert doc["epsilon_spent"] == eps == ledger.epsilon_spent
    assert doc["budget"] == {"epsilon": 1.0, "delta": DELTA, "accountant": "rdp", "unit": "scan"}
    assert ledger.remaining == pytest.approx(1.0 - eps)
    assert PrivacyLedger.load(file).epsilon_spent == eps


def test_write_order_fsync_then_replace_then_fsync_dir(tmp_path, monkeypatch):
    ledger = open_ledger(tmp_path)
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), real_replace(a, b))[1])
    ledger.charge(Charge(noise_multiplier=2.0, sample_rate=0.01, steps=10, round=1))
    assert events == ["fsync", "replace", "fsync"]


def test_over_budget_charge_raises_and_leaves_file_byte_identical(tmp_path, monkeypatch):
    ledger = open_ledger(tmp_path, epsilon=2.0)
    ledger.charge(Charge(noise_multiplier=1.0, sample_rate=0.01, steps=200, round=1))
    file = tmp_path / LEDGER_FILENAME
    before = file.read_bytes()
    spent = ledger.epsilon_spent
    big = Charge(noise_multiplier=1.0, sample_rate=0.01, steps=5000, round=2)
    requested = ledger.preview(big)
    assert requested > 2.0

    def no_write(*a, **k):
        raise AssertionError("the ledger file was touched for a refused charge")

    monkeypatch.setattr(ledger_mod, "_atomic_write", no_write)
    with pytest.raises(BudgetExceeded) as err:
        ledger.charge(big)
    msg = str(err.value)
    assert f"{spent:.6g}" in msg and f"{requested:.6g}" in msg and "epsilon=2" in msg
    assert "noise" in err.value.fix and "steps" in err.value.fix and "budget" in err.value.fix
    assert file.read_bytes() == before
    assert ledger.epsilon_spent == spent and len(ledger.entries) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [LEDGER_FILENAME, LEDGER_FILENAME + ".lock"]


def test_charge_exactly_at_budget_is_allowed(tmp_path):
    c = Charge(noise_multiplier=1.0, sample_rate=0.01, steps=300, round=1)
    eps = epsilon_for([c], delta=DELTA)
    ledger = open_ledger(tmp_path, epsilon=eps)
    assert ledger.charge(c) == eps and ledger.remaining == 0.0


def test_non_dp_charge_needs_an_infinite_budget(tmp_path):
    no_dp = Charge(noise_multiplier=0.0, sample_rate=1.0, steps=50, round=1, purpose="baseline")
    assert no_dp.dp is False
    dp_dir, nodp_dir = tmp_path / "dp", tmp_path / "nodp"
    ledger = open_ledger(dp_dir, epsilon=8.0)
    before = (dp_dir / LEDGER_FILENAME).read_bytes()
    with pytest.raises(BudgetExceeded, match="non-DP"):
        ledger.charge(no_dp)
    assert (dp_dir / LEDGER_FILENAME).read_bytes() == before

    ledger = open_ledger(nodp_dir, epsilon=math.inf)
    assert ledger.remaining == math.inf
    assert math.isfinite(ledger.charge(Charge(noise_multiplier=1.0, sample_rate=0.1, steps=10, round=0)))
    assert ledger.charge(no_dp) == math.inf and ledger.epsilon_spent == math.inf
    text = (nodp_dir / LEDGER_FILENAME).read_text()
    assert "Infinity" not in text and "NaN" not in text
    doc = json.loads(text)
    assert doc["budget"]["epsilon"] == "inf" and doc["epsilon_spent"] == "inf"
    assert [e["dp"] for e in doc["entries"]] == [True, False]
    assert PrivacyLedger.load(nodp_dir).epsilon_spent == math.inf


# ----------------------------------------------------------------------------------------------- (d) crash safety


def test_crash_in_replace_keeps_previous_ledger(tmp_path, monkeypatch):
    ledger = open_ledger(tmp_path, epsilon=5.0)
    ledger.charge(Charge(noise_multiplier=1.0, sample_rate=0.01, steps=100, round=1))
    file = tmp_path / LEDGER_FILENAME
    before, spent = file.read_bytes(), ledger.epsilon_spent

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(LedgerWriteError) as err:
        ledger.charge(Charge(noise_multiplier=1.0, sample_rate=0.01, steps=100, round=2))
    assert "release nothing" in err.value.fix
    monkeypatch.undo()
    assert file.read_bytes() == before
    assert ledger.epsilon_spent == spent and len(ledger.entries) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [LEDGER_FILENAME, LEDGER_FILENAME + ".lock"]
    reloaded = open_ledger(tmp_path, epsilon=5.0)
    assert reloaded.epsilon_spent == spent and [e.round for e in reloaded.entries] == [1]


def test_leftover_temp_file_never_masquerades_as_the_ledger(tmp_path, monkeypatch):
    ledger = open_ledger(tmp_path, epsilon=5.0)
    ledger.charge(Charge(noise_multiplier=1.0, sample_rate=0.01, steps=100, round=1))
    before = (tmp_path / LEDGER_FILENAME).read_bytes()

    def boom(src, dst):
        raise OSError(5, "I/O error")

    # a hard crash: the temp file was fully written but neither renamed nor cleaned up
    monkeypatch.setattr(os, "replace", boom)
    monkeypatch.setattr(os, "unlink", lambda p: None)
    with pytest.raises(LedgerWriteError):
        ledger.charge(Charge(noise_multiplier=1.0, sample_rate=0.01, steps=100, round=2))
    monkeypatch.undo()
    leftovers = [p for p in tmp_path.iterdir() if p.name not in (LEDGER_FILENAME, LEDGER_FILENAME + ".lock")]
    assert len(leftovers) == 1
    assert leftovers[0].name.startswith("." + LEDGER_FILENAME + ".") and leftovers[0].name.endswith(".tmp")
    assert (tmp_path / LEDGER_FILENAME).read_bytes() == before
    assert [e.round for e in open_ledger(tmp_path, epsilon=5.0).entries] == [1]


CHILD = r"""
import sys
from privacy.accounting import Charge, PrivacyLedger
ledger = PrivacyLedger.open(sys.argv[1], site_id="hospital-a", epsilon=1000.0, delta=1e-5)
for r in range(100000):
    eps = ledger.charge(Charge(noise_multiplier=4.0, sample_rate=0.01, steps=10, round=r, purpose="distill"))
    print("CHARGED", r, repr(eps), flush=True)  # the release would happen here
"""


def test_sigkill_right_after_charge_never_under_counts(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path)], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    seen = []
    try:
        deadline = math.inf  # counted from the first charge: importing torch takes minutes on a loaded machine
        while len(seen) < 5 and time.monotonic() < deadline:
            line = child.stdout.readline()
            if not line:
                break
            _, r, eps = line.split()
            seen.append((int(r), float(eps)))
            deadline = min(deadline, time.monotonic() + 60)
        os.kill(child.pid, signal.SIGKILL)  # mid-way through the next charge (or right after it)
    finally:
        child.kill()
        child.wait(timeout=30)
        child.stdout.close()
    assert len(seen) == 5, "the child never reported its charges"
    ledger = PrivacyLedger.load(tmp_path)  # loadable: never a torn file
    rounds = {e.round for e in ledger.entries}
    assert {r for r, _ in seen} <= rounds
    assert ledger.epsilon_spent >= seen[-1][1]


def test_concurrent_writers_lose_no_charge(tmp_path):
    ledgers = [open_ledger(tmp_path, epsilon=1000.0) for _ in range(2)]
    errors = []

    def work(k):
        try:
            for r in range(k, 24, 4):
                ledgers[k % 2].charge(Charge(noise_multiplier=4.0, sample_rate=0.01, steps=10, round=r))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    final = PrivacyLedger.load(tmp_path)
    assert sorted(e.round for e in final.entries) == list(range(24))
    assert final.epsilon_spent == pytest.approx(epsilon_for([(4.0, 0.01, 10)] * 24, delta=DELTA), rel=1e-12)


# ----------------------------------------------------------------------------------------------- (e) corrupt files


def _good_ledger_bytes(tmp_path):
    ledger = open_ledger(tmp_path, epsilon=5.0)
    ledger.charge(Charge(noise_multiplier=1.0, sample_rate=0.01, steps=100, round=1))
    ledger.charge(Charge(noise_multiplier=1.0, sample_rate=0.01, steps=100, round=2))
    return (tmp_path / LEDGER_FILENAME).read_bytes()


def _drop_last_entry(b: bytes) -> bytes:
    doc = json.loads(b)
    doc["entries"].pop()
    return json.dumps(doc).encode()


CORRUPTIONS = {
    "empty": lambda b: b"",
    "truncated": lambda b: b[: len(b) // 2],
    "garbage": lambda b: b"\xff\xfe\x00garbage",
    "not-an-object": lambda b: b"[]",
    "infinity-literal": lambda b: b.replace(b'"epsilon_spent": ', b'"epsilon_spent": Infinity, "x": '),
    "nan-sigma": lambda b: b.replace(b'"noise_multiplier": 1.0', b'"noise_multiplier": NaN', 1),
    "negative-steps": lambda b: b.replace(b'"steps": 100', b'"steps": -100', 1),
    "bad-status": lambda b: b.replace(b'"charged"', b'"pending"', 1),
    "entry-removed": _drop_last_entry,
    "missing-budget": lambda b: json.dumps({k: v for k, v in json.loads(b).items() if k != "budget"}).encode(),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corrupt_ledger_is_a_typed_error_never_a_reset(kind, tmp_path):
    bad = CORRUPTIONS[kind](_good_ledger_bytes(tmp_path))
    file = tmp_path / LEDGER_FILENAME
    file.write_bytes(bad)
    with pytest.raises(LedgerCorrupt) as err:
        open_ledger(tmp_path, epsilon=5.0)
    assert isinstance(err.value, MedfddError) and "under-count" in err.value.fix
    with pytest.raises(LedgerCorrupt):
        PrivacyLedger.load(file)
    assert file.read_bytes() == bad  # never overwritten with an empty ledger


def test_ledger_deleted_under_a_running_site_is_refused(tmp_path):
    ledger = open_ledger(tmp_path)
    ledger.charge(Charge(noise_multiplier=2.0, sample_rate=0.01, steps=10, round=1))
    (tmp_path / LEDGER_FILENAME).unlink()
    with pytest.raises(LedgerCorrupt, match="missing"):
        ledger.charge(Charge(noise_multiplier=2.0, sample_rate=0.01, steps=10, round=2))


def test_reopening_with_another_budget_or_site_is_refused(tmp_path):
    open_ledger(tmp_path, epsilon=1.0)
    with pytest.raises(LedgerMismatch, match="budget"):
        open_ledger(tmp_path, epsilon=2.0)
    with pytest.raises(LedgerMismatch, match="budget"):
        open_ledger(tmp_path, epsilon=1.0, accountant="prv")
    with pytest.raises(LedgerMismatch, match="site"):
        PrivacyLedger.open(tmp_path, site_id="hospital-b", epsilon=1.0, delta=DELTA)
    with pytest.raises(InvalidPrivacyParameter):
        PrivacyLedger.open(tmp_path / "other", site_id="x", epsilon=0.0, delta=DELTA)
    # epsilons spent per scan and per patient do not add up to a guarantee for either: the unit is fixed too
    with pytest.raises(LedgerMismatch, match="unit"):
        open_ledger(tmp_path, epsilon=1.0, unit="patient")
    with pytest.raises(InvalidPrivacyParameter, match="unit"):
        open_ledger(tmp_path / "other", unit="visit")


def test_a_ledger_from_before_privacy_units_protects_scans_and_a_forged_unit_is_corrupt(tmp_path):
    ledger = open_ledger(tmp_path)
    ledger.charge(Charge(noise_multiplier=2.0, sample_rate=0.01, steps=10, round=1))
    file = tmp_path / LEDGER_FILENAME
    doc = json.loads(file.read_text())
    del doc["budget"]["unit"]
    file.write_text(json.dumps(doc))
    assert PrivacyLedger.load(file).budget.unit == "scan"
    assert open_ledger(tmp_path).epsilon_spent == ledger.epsilon_spent  # reopens under the default unit
    doc["budget"]["unit"] = "visit"
    file.write_text(json.dumps(doc))
    with pytest.raises(LedgerCorrupt, match="unit"):
        PrivacyLedger.load(file)


# ----------------------------------------------------------------------------------------------- (f) idempotency


def test_same_round_and_purpose_is_charged_once(tmp_path):
    c = Charge(noise_multiplier=1.2, sample_rate=0.02, steps=100, round=1, purpose="distill")
    ledger = open_ledger(tmp_path, epsilon=5.0)
    eps = ledger.charge(c)
    file = tmp_path / LEDGER_FILENAME
    before = file.read_bytes()
    assert ledger.find_charge(1, "distill").steps == 100
    assert ledger.find_charge(2, "distill") is None
    assert ledger.preview(c) == eps
    assert ledger.charge(c) == eps
    resumed = open_ledger(tmp_path, epsilon=5.0)  # a restarted run re-plans the same round
    assert resumed.charge(c) == eps
    assert file.read_bytes() == before and len(resumed.entries) == 1
    with pytest.raises(ChargeConflict):
        resumed.charge(Charge(noise_multiplier=1.2, sample_rate=0.02, steps=101, round=1, purpose="distill"))
    assert file.read_bytes() == before
    other = resumed.charge(Charge(noise_multiplier=1.2, sample_rate=0.02, steps=100, round=1, purpose="metrics"))
    assert other > eps and len(resumed.entries) == 2


def test_one_charge_buys_one_release(tmp_path):
    """A rerun of a charged round may replay the same release (resume) but not publish another one for free."""
    c = Charge(noise_multiplier=1.2, sample_rate=0.02, steps=100, round=1, purpose="distill", release="a" * 32)
    ledger = open_ledger(tmp_path, epsilon=5.0)
    eps = ledger.charge(c)
    file = tmp_path / LEDGER_FILENAME
    before = file.read_bytes()
    assert json.loads(before)["entries"][0]["release"] == "a" * 32
    reloaded = PrivacyLedger.load(tmp_path)
    assert reloaded.entries[0].release == "a" * 32 and reloaded.charge(c) == eps  # the same release: a no-op
    other = Charge(noise_multiplier=1.2, sample_rate=0.02, steps=100, round=1, purpose="distill", release="b" * 32)
    assert reloaded.preview(other) > eps
    with pytest.raises(ChargeConflict, match="another one") as e:
        reloaded.charge(other)
    assert "noise_key" in e.value.fix
    assert file.read_bytes() == before
    with pytest.raises(InvalidPrivacyParameter):
        Charge(noise_multiplier=1.2, sample_rate=0.02, steps=100, release="")


# ----------------------------------------------------------------------------------------------- (g) monotonicity

charges = st.builds(
    Charge,
    noise_multiplier=st.floats(0.3, 10.0),
    sample_rate=st.floats(1e-3, 1.0),
    steps=st.integers(1, 2000),
    dp=st.sampled_from([True] * 9 + [False]),
)


@settings(max_examples=25, deadline=None)
@given(st.lists(charges, min_size=1, max_size=6))
def test_epsilon_spent_is_monotone_in_the_entries(cs):
    with tempfile.TemporaryDirectory() as d:
        ledger = PrivacyLedger.open(d, site_id="s", epsilon=math.inf, delta=DELTA)
        spent = [ledger.epsilon_spent]
        for r, c in enumerate(cs):
            charge = Charge(
                noise_multiplier=c.noise_multiplier, sample_rate=c.sample_rate, steps=c.steps, round=r, dp=c.dp
            )
            assert ledger.preview(charge) == ledger.charge(charge)
            spent.append(ledger.epsilon_spent)
        assert all(b >= a for a, b in zip(spent, spent[1:], strict=False))
        assert spent[-1] == PrivacyLedger.load(d).epsilon_spent
        assert (spent[-1] == math.inf) == any(not c.dp for c in cs)
