"""Hybrid mode end to end, in-process: distillation round, then DP-FedAvg fine-tuning rounds from the trained global
model; every site's ledger composes its count, distillation and fine-tuning charges to at most its epsilon."""

from __future__ import annotations

import json
import math

import dp_accounting
import pytest
import torch
from conftest import assert_final_model_delivered, assert_png, hybrid_sites
from rich.console import Console
from safetensors.torch import load_file

from medfdd.charts import run_progress
from medfdd.config import load_coordinator_config, load_site_config
from medfdd.coordinator.run import CoordinatorError
from medfdd.federation.inprocess import open_inprocess, run_inprocess
from medfdd.messages import LocalUpdate
from medfdd.rundir import RunDir
from medfdd.site.budget import print_budget
from medfdd.site.finetune import finetune_site
from medfdd.site.offer import make_offer
from medfdd.site.record_count import COUNT_FILE
from privacy.accounting import PrivacyLedger

pytestmark = pytest.mark.slow  # scheduled first (tests/conftest.py)

QUIET = Console(quiet=True)
EPS, SHARE, DELTA = 1.0, 0.5, 1e-5
FINETUNE = {"rounds": 2, "local_epochs": 1, "lr": 0.2, "batch_size": 64, "clip_norm": 1.0}


def _hybrid(digits_consortium, *, site_rounds: int = 2, **kw):
    coord = digits_consortium(name="hybrid", sites=2, finetune=FINETUNE, **kw)
    return coord, hybrid_sites(coord, share=SHARE, rounds=site_rounds)


def _rdp_epsilon(entries) -> float:
    """An independent accountant (Google's dp_accounting RDP) over the ledger's entries."""
    acc = dp_accounting.rdp.RdpAccountant()
    for e in entries:
        event = dp_accounting.GaussianDpEvent(e.noise_multiplier)
        if e.sample_rate < 1:
            event = dp_accounting.PoissonSampledDpEvent(e.sample_rate, event)
        acc.compose(dp_accounting.SelfComposedDpEvent(event, e.steps))
    return acc.get_epsilon(DELTA)


def test_hybrid_run_fine_tunes_the_warm_start_within_each_sites_budget_and_resumes(digits_consortium):
    coord, sites = _hybrid(digits_consortium)
    out = load_coordinator_config(coord).output_dir
    run = open_inprocess(load_coordinator_config(coord), console=QUIET)
    b = run.broadcast()
    for sid, p in sorted(sites.items()):
        run.receive(make_offer(load_site_config(p), b, console=QUIET), sender=sid)
    run.finish_round()
    assert run.next_round is None and run.next_finetune_round == 1 and not run.complete
    task = run.finetune_task()
    first = sorted(sites)[0]  # a model that is no model is left out with its reason; the site's real one counts
    assert not run.receive_update(LocalUpdate(first, 1, b"\0" * 64, {"site_id": first, "round": 1, "epsilon": 0.9,
                                                                      "noise_multiplier": 1.0, "sample_rate": 0.1,
                                                                      "steps": 3}), sender=first)
    for sid, p in sorted(sites.items()):
        run.sent(sid, task.nbytes())
        assert run.receive_update(finetune_site(load_site_config(p), task, console=QUIET), sender=sid)
    run.finish_finetune_round()
    task2 = run.finetune_task()
    run.receive_update(finetune_site(load_site_config(sites[first]), task2, console=QUIET), sender=first)
    del run  # the coordinator dies with fine-tuning round 2 half received

    resumed = open_inprocess(load_coordinator_config(coord), console=QUIET)
    assert resumed.next_round is None and resumed.next_finetune_round == 2
    run_inprocess(load_coordinator_config(coord), console=QUIET)  # finishes round 2 (the first site's round 2 replays under its charge)
    doc = json.loads((out / "run.json").read_text())
    assert doc["status"] == "completed"
    ft = doc["finetune"]
    assert [r["round"] for r in ft["rounds"]] == [1, 2] and ft["recipe"] == FINETUNE
    model_size = (out / "global_model.safetensors").stat().st_size
    assert [(x["site_id"], x["reason"]) for x in ft["rounds"][0]["rejected"]] == [(first, "malformed")]
    assert ft["rounds"][1]["rejected"] == []
    for r in ft["rounds"]:
        assert r["accepted"] == sorted(sites)
        assert 0 <= r["metrics"]["accuracy"] <= 1
        for s in sites:
            assert r["bytes_up"][s] > model_size and r["bytes_down"][s] > model_size
            assert 0 < r["epsilon"][s] <= EPS * (1 + 1e-6)
            assert r["weights"][s] == pytest.approx(FINETUNE["batch_size"] / r["sample_rate"][s])
    # the final model is the fine-tuned one; the warm start is kept beside it
    warm = out / "warm_start_model.safetensors"
    assert warm.read_bytes() == (out / "rounds" / "round-1" / "global_model.safetensors").read_bytes()
    final, start = load_file(out / "global_model.safetensors"), load_file(warm)
    assert any(not torch.equal(final[k], start[k]) for k in start)
    assert all(torch.equal(final[k], v) for k, v in load_file(out / "finetune" / "round-2" /
                                                               "global_model.safetensors").items())
    assert ft["warm_start"]["metrics"]["accuracy"] == doc["rounds"][0]["metrics"]["accuracy"]
    # progress.png covers the fine-tuning rounds, told apart from the distillation round
    assert [(p["label"], p["kind"]) for p in run_progress(doc)] == [("1", "distill"), ("ft 1", "finetune"),
                                                                     ("ft 2", "finetune")]
    assert_png(RunDir(out).progress)
    assert doc["final"]["finetune_round"] == 2
    assert doc["final"]["accuracy"] == ft["rounds"][1]["metrics"]["accuracy"]
    assert doc["final"]["bytes_up_total"] == sum(sum(r["bytes_up"].values()) for r in doc["rounds"] + ft["rounds"])

    for sid, p in sites.items():
        cfg = load_site_config(p)
        ledger = PrivacyLedger.load(cfg.output_dir / "privacy_ledger.json")
        assert [(e.purpose, e.round) for e in ledger.entries] == [
            ("record-count", 1), ("distill", 1), ("finetune", 1), ("finetune", 2)]  # round 2 paid once
        independent = _rdp_epsilon(ledger.entries)
        assert ledger.epsilon_spent <= EPS * (1 + 1e-9) and independent <= EPS * 1.01
        assert ledger.epsilon_spent >= 0.95 * EPS  # the fine-tuning takes what the distillation left
        assert _rdp_epsilon(ledger.entries[:2]) <= (1 - SHARE) * EPS * 1.01  # the distillation kept to its share
        n_est = json.loads((cfg.output_dir / COUNT_FILE).read_text())["n_estimate"]
        for e in ledger.entries[2:]:
            assert e.sample_rate == FINETUNE["batch_size"] / n_est and e.steps == math.ceil(n_est / 64)
        assert ft["rounds"][1]["epsilon"][sid] == pytest.approx(ledger.epsilon_spent)
        # the run's copy of the ledger has the fine-tuning charges; `site budget` lists them
        assert (out / "sites" / sid / "privacy_ledger.json").read_bytes() == ledger.path.read_bytes()
        budget = print_budget(load_site_config(p), console=QUIET)
        assert [r["purpose"] for r in budget["rounds"]] == ["record-count", "distill", "finetune", "finetune"]
        assert budget["rounds"][-1]["epsilon_after"] == pytest.approx(ledger.epsilon_spent)
        assert_png(budget["chart"])  # the fine-tuning charges drawn against the budget
    assert_final_model_delivered(out, sites)


def test_a_coordinator_asking_more_fine_tuning_rounds_than_a_site_planned_is_refused(digits_consortium):
    coord, sites = _hybrid(digits_consortium, site_rounds=1)
    with pytest.raises(CoordinatorError, match="finetune_rounds"):
        open_inprocess(load_coordinator_config(coord), console=QUIET)
