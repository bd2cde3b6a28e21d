"""`medfdd demo` end to end at a reduced size: the summary's numbers are the run's own (run.json, ledgers, report)."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from medfdd.demo import run_demo

pytestmark = pytest.mark.slow  # scheduled first (tests/conftest.py)


def test_demo_summary_comes_from_the_runs_files(tmp_path):
    s = run_demo(tmp_path / "demo", iterations=2, train_epochs=5, train_width=16, baseline_epochs=2, shadows=2,
                 canaries=8, console=Console(quiet=True))
    run_dir = tmp_path / "demo" / "runs" / "coordinator"
    run = json.loads((run_dir / "run.json").read_text())
    report = json.loads((tmp_path / "demo" / "audit-report" / "report.json").read_text())
    assert run["status"] == "completed"
    assert s["accuracy"] == run["final"]["accuracy"] and s["auc"] == run["final"]["auc"]
    assert s["verdict"] == report["verdict"]
    assert (tmp_path / "demo" / "audit-report" / "report.html").is_file()
    assert set(s["sites"]) == set(run["sites"]) == {"hospital-a", "hospital-b", "hospital-c"}
    for sid, v in s["sites"].items():
        ledger = json.loads((run_dir / "sites" / sid / "privacy_ledger.json").read_text())
        assert v["epsilon_spent"] == pytest.approx(ledger["epsilon_spent"]) and 0 < v["epsilon_spent"] <= 1.0
        assert v["bytes_up"] == run["rounds"][0]["bytes_up"][sid] > 0
        assert v["used"] > 0
        evaluation = json.loads((tmp_path / "demo" / "runs" / sid / "evaluation.json").read_text())
        assert v["holdout_accuracy"] == evaluation["results"]["holdout"]["accuracy"]
    baselines = json.loads((run_dir / "baselines.json").read_text())
    assert s["centralized_accuracy"] == baselines["centralized_accuracy"]
    # DICOM and NIfTI hospitals
    formats = {p.suffix for p in (tmp_path / "demo").glob("hospital-*/**/*") if p.is_file() and p.name != "labels.csv"}
    assert ".dcm" in formats and ".gz" in formats
