"""`medfdd demo` end to end at a reduced size: the summary's numbers are the run's own (run.json, ledgers, each
site's evaluation.json, baselines.json, report.json), and the data it ran on is the one it says."""

from __future__ import annotations

import io
import json

import pytest
from rich.console import Console

from medfdd.demo import SETTINGS, choose_source, run_demo
from medfdd.prepare.sources import FASHION_MNIST_FILES

# the Fashion-MNIST demo's audit (no LiRA shadow pipelines) on a digits run of a few steps
SMALL = {"iterations": 2, "train_epochs": 5, "train_width": 16, "site_epochs": 2, "baseline_epochs": 2,
         "canaries": 8, "attacks": SETTINGS["fashion-mnist"].attacks,
         "fedavg": {"rounds": 2, "lr": 0.2, "batch_size": 64}}


@pytest.mark.slow  # scheduled first (tests/conftest.py)
def test_demo_summary_comes_from_the_runs_files(tmp_path):
    console = Console(file=io.StringIO(), record=True, width=200)
    s = run_demo(tmp_path / "demo", source="digits", overrides=SMALL, console=console)
    shown = console.export_text()
    run_dir = tmp_path / "demo" / "runs" / "coordinator"
    run = json.loads((run_dir / "run.json").read_text())
    report = json.loads((tmp_path / "demo" / "audit-report" / "report.json").read_text())
    assert run["status"] == "completed"
    assert s["data"] == {"source": "digits", "why": "asked for"} and "data: digits (asked for)" in shown
    assert s["accuracy"] == run["final"]["accuracy"] and s["auc"] == run["final"]["auc"]
    assert s["verdict"] == report["verdict"]
    assert {r["attack"] for r in report["results"]} == set(SMALL["attacks"])  # the setting reached the audit
    assert (tmp_path / "demo" / "audit-report" / "report.html").is_file()
    assert set(s["sites"]) == set(run["sites"]) == {"hospital-a", "hospital-b", "hospital-c"}
    for sid, v in s["sites"].items():
        ledger = json.loads((run_dir / "sites" / sid / "privacy_ledger.json").read_text())
        assert v["epsilon_spent"] == pytest.approx(ledger["epsilon_spent"]) and 0 < v["epsilon_spent"] <= 1.0
        assert v["bytes_up"] == run["rounds"][0]["bytes_up"][sid] > 0
        assert v["used"] > 0
        evaluation = json.loads((tmp_path / "demo" / "runs" / sid / "evaluation.json").read_text())
        models = evaluation["models"]
        assert v["holdout_accuracy"] == models["global"]["results"]["holdout"]["accuracy"]
        assert v["fine_tuned_holdout_accuracy"] == models["fine_tuned"]["results"]["holdout"]["accuracy"]
        assert v["local_only_holdout_accuracy"] == models["local_only"]["results"]["holdout"]["accuracy"]
        assert evaluation["site_recipe"]["epochs"] == SMALL["site_epochs"]  # the demo's setting reached the site
        row = next(line for line in shown.splitlines() if line.strip(" │|").startswith(sid)
                   and f"{v['fine_tuned_holdout_accuracy']:.3f}" in line)
        assert f"{v['local_only_holdout_accuracy']:.3f}" in row and f"{v['holdout_accuracy']:.3f}" in row
    baselines = json.loads((run_dir / "baselines.json").read_text())
    assert s["centralized_accuracy"] == baselines["centralized_accuracy"]
    assert s["local_only_accuracy"] == baselines["local_only_accuracy"]
    assert set(baselines["cpu_seconds"]) == {"centralized", "local_only", "dp_fedavg"}
    assert set(s["stage_cpu_seconds"]) == set(s["stage_seconds"]) == {"prepare", "check", "round", "baselines", "audit"}
    fed = baselines["dp_fedavg"]
    assert s["dp_fedavg_accuracy"] == fed["accuracy"] and fed["settings"]["rounds"] == s["dp_fedavg_rounds"] == 2
    # DP-FedAvg at the sites' epsilon, over the same sites' training patients
    assert set(fed["epsilon_per_site"]) == set(run["sites"])
    assert all(0 < e <= s["epsilon"] == fed["epsilon"] == 1.0 for e in fed["epsilon_per_site"].values())
    for label, value in (("medfdd", s["accuracy"]), ("DP-FedAvg", s["dp_fedavg_accuracy"]),
                         ("local-only", s["local_only_accuracy"]), ("centralized", s["centralized_accuracy"])):
        assert any(label in line and f"{value:.3f}" in line for line in shown.splitlines()), label
    # DICOM and NIfTI hospitals
    formats = {p.suffix for p in (tmp_path / "demo").glob("hospital-*/**/*") if p.is_file() and p.name != "labels.csv"}
    assert ".dcm" in formats and ".gz" in formats


def test_demo_runs_fashion_mnist_where_installed_and_says_why_it_falls_back(tmp_path):
    source, why = choose_source(search_dirs=[tmp_path])
    assert source == "digits" and "Fashion-MNIST is not installed" in why and "make demo-data" in why
    for name in FASHION_MNIST_FILES.values():
        (tmp_path / name).write_bytes(b"")
    assert choose_source(search_dirs=[tmp_path]) == ("fashion-mnist", f"found in {tmp_path}")
    assert choose_source("digits", search_dirs=[tmp_path]) == ("digits", "asked for")
