"""The optional audit gate on the offer path: a site whose own DCR audit breaks its thresholds offers nothing."""

from __future__ import annotations

import json

import yaml

from medfdd.cli import main
from medfdd.config import load_coordinator_config, load_site_config


def test_failing_gate_withholds_the_offer_and_a_passing_gate_lets_it_through(digits_consortium):
    coord = digits_consortium(sites=2)
    paths = {load_site_config(p).site_id: p for p in load_coordinator_config(coord).site_paths}
    strict, lenient = sorted(paths)
    gates = {strict: {"max_auc": 0.01, "max_tpr_at_fpr_0_01": None},  # no real audit gives AUC <= 0.01
             lenient: {"max_auc": 1.0, "max_tpr_at_fpr_0_01": 1.0}}
    for sid, gate in gates.items():
        cfg = yaml.safe_load(paths[sid].read_text())
        cfg["audit_gate"] = gate
        paths[sid].write_text(yaml.safe_dump(cfg))
    assert main(["coordinator", "run", str(coord)]) == 0
    run = json.loads((load_coordinator_config(coord).output_dir / "run.json").read_text())
    r = run["rounds"][0]
    assert r["accepted"] == [lenient]
    assert [(x["site_id"], x["reason"]) for x in r["rejected"]] == [(strict, "site_failed")]
    assert r["rejected"][0]["detail"] == "site error: site-failed"  # not the gate's why
    assert strict not in r["bytes_up"]  # nothing was sent
    for sid, passed in ((strict, False), (lenient, True)):
        report = json.loads((load_site_config(paths[sid]).output_dir / "audit_gate.json").read_text())
        assert report["passed"] is passed
        row = report["results"][0]
        assert row["attack"] == "dcr" and row["n_members"] > 0 and row["n_nonmembers"] > 0
        assert 0 <= row["auc"] <= 1 and row["epsilon_lower_bound"] <= row["epsilon_accounted"]
        assert 0 < row["auc_p_value"] <= 1  # per patient, for gates that ask for significance
