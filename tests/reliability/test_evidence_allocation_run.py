"""Sites with `distill.allocation: evidence` through two in-process rounds: every offer passes the coordinator's
check that its images per class are the allocation of its own released class evidence, warm start included. The
run sets `train_rounds: 1`, so it also pins that choice: each round's global model trains on that round's merged set
alone (the default, 0, trains on every round's)."""

from __future__ import annotations

import json

import numpy as np
from reliability_helpers import tiny_consortium
from rich.console import Console

from medfdd.artifacts import load_synthetic
from medfdd.config import load_coordinator_config, load_site_config
from medfdd.distill.base import evidence_allocation
from medfdd.federation.inprocess import run_inprocess


def test_evidence_allocated_offers_are_accepted_in_every_round(tmp_path):
    coord = tiny_consortium(tmp_path / "c", sites=2, rounds=2, per_class=20, distill={"allocation": "evidence"},
                            train_rounds=1)
    run_inprocess(load_coordinator_config(coord), console=Console(quiet=True))
    cfg = load_coordinator_config(coord)
    run = json.loads((cfg.output_dir / "run.json").read_text())
    assert run["status"] == "completed" and len(run["rounds"]) == 2
    for r in run["rounds"]:
        assert r["rejected"] == [] and len(r["accepted"]) == 2
        assert r["trained_on_rounds"] == [r["round"]] and r["n_trained_on"] == r["n_merged"]
    for path in cfg.site_paths:
        site = load_site_config(path)
        syn = load_synthetic(site.output_dir)
        assert syn.meta["allocation"] == "evidence" and syn.meta["round"] == 2
        counts = np.bincount(syn.labels, minlength=len(site.data.classes)).tolist()
        total = site.distill.ipc * len(site.data.classes)
        assert counts == evidence_allocation(syn.meta["class_evidence"], syn.meta["sample_rate"], total)
