"""`medfdd coordinator run` in-process on digits sites from `prepare`: run directory, rounds, resume, bad sites."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml
from conftest import assert_final_model_delivered, assert_png
from rich.console import Console

from medfdd.artifacts import load_model, load_synthetic
from medfdd.cli import main
from medfdd.config import load_coordinator_config, load_site_config
from medfdd.coordinator.merge import evidence_weights
from medfdd.coordinator.run import CoordinatorError
from medfdd.coordinator.validate import Reason
from medfdd.federation.inprocess import open_inprocess
from medfdd.messages import to_wire
from medfdd.rundir import RunDir
from medfdd.site.offer import make_offer
from privacy.accounting import PrivacyLedger

pytestmark = pytest.mark.slow  # scheduled first (tests/conftest.py)

QUIET = Console(quiet=True)


def _sites(coord_path):
    cfg = load_coordinator_config(coord_path)
    return {load_site_config(p).site_id: p for p in cfg.site_paths}


def test_two_round_run_writes_the_run_directory_and_charges_each_site_once_per_round(digits_consortium, capsys):
    coord = digits_consortium(rounds=2)
    assert main(["coordinator", "run", str(coord), "--json"]) == 0
    out = load_coordinator_config(coord).output_dir
    run = json.loads((out / "run.json").read_text())
    printed = capsys.readouterr()
    assert json.loads(printed.out) == run  # --json: the result alone on stdout, the messages on stderr
    epochs = load_coordinator_config(coord).train.epochs
    for r in (1, 2):  # the training progress bar of each round, finished
        assert f"round {r}: training the global model (epochs)" in printed.err
    assert printed.err.count(f"{epochs}/{epochs}") >= 2
    assert any("run directory:" in p.read_text() for p in (out / "logs").glob("coordinator-run-*.log"))
    assert run["status"] == "completed" and run["engine"] == "inprocess"
    assert [r["round"] for r in run["rounds"]] == [1, 2]
    sites = sorted(_sites(coord))
    model_bytes = (out / "rounds" / "round-1" / "global_model.safetensors").stat().st_size
    for r in run["rounds"]:
        assert r["accepted"] == sites and r["rejected"] == []
        m = r["metrics"]
        assert 0 <= m["accuracy"] <= 1 and 0 <= m["balanced_accuracy"] <= 1 and 0 <= m["auc"] <= 1
        assert set(r["seconds"]) == {"sites", "merge", "train", "evaluate"}
        for s in sites:  # a synthetic set of 10 classes x 5 images of 16x16 float32 plus labels and metadata
            assert r["bytes_up"][s] > 50 * 16 * 16 * 4 + 50 * 8
    assert all(run["rounds"][0]["bytes_down"][s] < 1000 for s in sites)  # round 1: no model yet
    assert all(run["rounds"][1]["bytes_down"][s] > model_bytes for s in sites)  # round 2: the global model
    assert run["final"]["accuracy"] == run["rounds"][1]["metrics"]["accuracy"]
    assert run["final"]["bytes_up_total"] == run["final"]["bytes_up"] == sum(sum(r["bytes_up"].values())
                                                                            for r in run["rounds"])
    for r in run["rounds"]:
        for s in sites:
            per = r["per_site"][s]
            assert per["accepted"] and per["bytes_up"] == r["bytes_up"][s] and 0 < per["epsilon"] <= 1
            assert per["privacy_unit"] == "scan"  # the default: epsilon protects each scan

    merged = np.load(out / "merged.npz", allow_pickle=False)
    assert len(merged["labels"]) == run["final"]["n_merged"] == sum(
        len(load_synthetic(out / "sites" / s).labels) for s in sites)
    load_model(out / "global_model.safetensors", expect={"num_classes": 10, "spatial_size": [16, 16]})
    for s, path in _sites(coord).items():
        ledger = PrivacyLedger.load(out / "sites" / s / "privacy_ledger.json")
        # one charge per round, and the DP record count (paid once, before round 1)
        assert sorted((e.round, e.purpose) for e in ledger.entries) == [(1, "distill"), (1, "record-count"),
                                                                        (2, "distill")]
        assert ledger.epsilon_spent <= 1.0 + 1e-9
        assert json.loads((out / "sites" / s / "synthetic.json").read_text())["round"] == 2
        # the copy in the run directory is the site's own ledger
        site_ledger = load_site_config(path).output_dir / "privacy_ledger.json"
        assert (out / "sites" / s / "privacy_ledger.json").read_bytes() == site_ledger.read_bytes()
    assert_final_model_delivered(out, _sites(coord))


def test_killed_mid_round_resumes_after_the_last_finished_round_without_double_charges(digits_consortium):
    coord = digits_consortium(rounds=2)
    sites = _sites(coord)
    run = open_inprocess(load_coordinator_config(coord), console=QUIET)
    b = run.broadcast()
    for sid, p in sorted(sites.items()):
        run.receive(make_offer(load_site_config(p), b, console=QUIET), sender=sid)
    first = run.finish_round()
    progress = RunDir(load_coordinator_config(coord).output_dir).progress
    one_round = progress.read_bytes()  # drawn after every round
    assert_png(progress)
    b2 = run.broadcast()
    first_site = sorted(sites)[0]
    run.receive(make_offer(load_site_config(sites[first_site]), b2, console=QUIET), sender=first_site)
    del run  # the coordinator dies with round 2 half received

    resumed = open_inprocess(load_coordinator_config(coord), console=QUIET)
    assert resumed.next_round == 2 and len(resumed.history) == 1
    assert resumed.history[0]["metrics"]["accuracy"] == pytest.approx(first["metrics"]["accuracy"])
    b2 = resumed.broadcast()
    for sid, p in sorted(sites.items()):
        assert resumed.receive(make_offer(load_site_config(p), b2, console=QUIET), sender=sid)
    resumed.finish_round()
    assert resumed.next_round is None
    assert_png(progress)  # redrawn with round 2 (round 1 read back from the checkpoint)
    assert progress.read_bytes() != one_round
    run_json = json.loads((resumed.close() / "run.json").read_text())
    assert run_json["status"] == "completed" and len(run_json["rounds"]) == 2
    for p in sites.values():  # the site asked twice for round 2 paid once
        ledger = PrivacyLedger.load(load_site_config(p).output_dir / "privacy_ledger.json")
        assert sorted(e.round for e in ledger.entries if e.purpose == "distill") == [1, 2]
    # a finished run is not run again
    again = open_inprocess(load_coordinator_config(coord), console=QUIET)
    assert again.next_round is None


def test_round_completes_without_a_failing_site_and_a_hostile_offer(digits_consortium):
    coord = digits_consortium(merge="evidence")
    sites = _sites(coord)
    a, b, c = sorted(sites)
    # site b's config now plans a delta above 1/n: its distillation refuses to run
    cfg_b = yaml.safe_load(sites[b].read_text())
    cfg_b["privacy"]["delta"] = 0.5
    sites[b].write_text(yaml.safe_dump(cfg_b))
    assert main(["coordinator", "run", str(coord)]) == 0
    run = json.loads((load_coordinator_config(coord).output_dir / "run.json").read_text())
    r = run["rounds"][0]
    assert r["accepted"] == [a, c]
    assert [(x["site_id"], x["reason"]) for x in r["rejected"]] == [(b, "site_failed")]
    # the coordinator learns the generic code only: no error class, no message (which names 1/n), no path
    assert r["rejected"][0]["detail"] == "site error: site-failed"
    assert run["status"] == "completed" and run["final"]["accuracy"] >= 0
    # a site whose distillation failed still receives the consortium's final model
    assert_final_model_delivered(load_coordinator_config(coord).output_dir, sites)
    # evidence merge: the global model trained with the weights derived from the sites' released class_evidence
    out = load_coordinator_config(coord).output_dir
    with np.load(out / "merged.npz", allow_pickle=False) as z:
        labels, weights = z["labels"], z["weights"]
    site_labels = [load_synthetic(out / "sites" / s).labels for s in (a, c)]
    evidence = np.array([load_synthetic(out / "sites" / s).meta["class_evidence"] for s in (a, c)])
    site_of = np.concatenate([np.full(len(y), i) for i, y in enumerate(site_labels)])
    assert np.allclose(weights, evidence_weights(evidence, site_of, labels, power=2.0), atol=1e-6)
    assert not np.allclose(weights, 1.0) and np.allclose(r["class_weight"], np.bincount(labels, minlength=10))


def test_hostile_offer_is_logged_and_the_others_are_merged(digits_consortium):
    coord = digits_consortium(name="hostile")
    sites = _sites(coord)
    a, b, c = sorted(sites)
    run = open_inprocess(load_coordinator_config(coord), engine="test", console=QUIET)
    bc = run.broadcast()
    offers = {s: make_offer(load_site_config(p), bc, console=QUIET) for s, p in sites.items()}
    poisoned = offers[b]
    images = np.full(poisoned.arrays["images"].shape, np.nan, dtype=np.float32)
    poisoned.arrays["images"] = to_wire(images)
    assert run.receive(offers[a], sender=a)
    assert not run.receive(poisoned, sender=b)
    assert not run.receive(offers[a], sender=a)  # a duplicate is refused too
    assert not run.receive(offers[a], sender="impostor")  # another sender for a site bound to its first sender
    assert run.receive(offers[c], sender=c)
    run.no_answer("node-9", "unreadable offer", code=Reason.MALFORMED, nbytes=1234)  # bytes the engine could not read
    h = run.finish_round()
    assert h["accepted"] == [a, c] and h["n_merged"] == 2 * 50
    assert {(x["site_id"], x["reason"]) for x in h["rejected"]} == {(b, "non_finite"), (a, "duplicate_offer"),
                                                                     (a, "spoofed_site_id"), ("node-9", "malformed")}
    assert h["bytes_up"]["node-9"] == 1234
    assert h["bytes_up"][f"{a} from impostor"] == offers[a].nbytes()  # counted under who sent it
    assert h["bytes_up"][b] > 0  # what was sent is counted even when refused
    assert h["bytes_up"][a] == 2 * offers[a].nbytes()  # the refused duplicate too
    assert math.isfinite(h["metrics"]["accuracy"])


def test_a_round_where_every_offer_is_refused_fails_loudly(digits_consortium):
    coord = digits_consortium(name="none", sites=2)
    run = open_inprocess(load_coordinator_config(coord), engine="test", console=QUIET)
    run.broadcast()
    with pytest.raises(CoordinatorError, match="no site offered"):
        run.finish_round()
    assert json.loads((run.out / "run.json").read_text())["status"] == "failed"
