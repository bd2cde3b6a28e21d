"""The quorum (`min_sites`): a round completes only with at least that many accepted offers; otherwise the run stops
with its reason in run.json, `coordinator run` exits non-zero, and a resumed run pays nothing twice."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from flwr.app import Error
from flwr.common.constant import ErrorCode

from medfdd.cli import main
from medfdd.config import ConfigError, load_coordinator_config, load_site_config
from medfdd.coordinator.validate import Reason
from medfdd.exit_codes import RUNTIME_ERROR
from medfdd.federation.flower.server_app import silence
from privacy.accounting import LEDGER_FILENAME, PrivacyLedger


def _sites(coord) -> dict:
    return {load_site_config(p).site_id: p for p in load_coordinator_config(coord).site_paths}


def _distill_charges(site_config) -> list[int]:
    ledger = PrivacyLedger.load(load_site_config(site_config).output_dir / LEDGER_FILENAME)
    return sorted(e.round for e in ledger.entries if e.purpose == "distill")


def test_a_round_below_the_quorum_stops_the_run_and_a_resumed_run_pays_nothing_twice(digits_consortium, capsys):
    coord = digits_consortium(name="quorum", min_sites=3)
    sites = _sites(coord)
    a, b, c = sorted(sites)
    scans_b = load_site_config(sites[b]).data_root
    scans_b.rename(scans_b.with_name("away"))  # site b's scans are unreachable: it fails as `site-failed`

    assert main(["coordinator", "run", str(coord)]) == RUNTIME_ERROR
    assert "quorum not met: 2 of 3 site(s) accepted, min_sites is 3" in capsys.readouterr().err
    out = load_coordinator_config(coord).output_dir
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "failed" and run["rounds"] == [] and run["final"] is None
    stopped = run["stopped"]
    assert stopped["round"] == 1 and not stopped["finetune"]
    assert stopped["accepted"] == [a, c] and stopped["answered"] == [a, b, c]  # b answered, with a failure code
    assert stopped["missing"] == {b: Reason.SITE_FAILED.value}
    assert (stopped["min_sites"], stopped["n_accepted"], stopped["n_sites"], stopped["met"]) == (3, 2, 3, False)
    assert not (out / "global_model.safetensors").exists()  # nothing was merged or trained below the quorum
    released = {s: np.load(load_site_config(sites[s]).output_dir / "synthetic.npz", allow_pickle=False)["images"]
                for s in (a, c)}
    assert all(_distill_charges(sites[s]) == [1] for s in (a, c))

    # the consortium lowers its quorum to 2 (b stays down); the same run resumes round 1: a and c reuse their charge
    # and release the same sets again, which are now merged
    doc = yaml.safe_load(coord.read_text())
    doc["min_sites"] = 2
    coord.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert main(["coordinator", "run", str(coord)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed" and "stopped" not in run
    r = run["rounds"][0]
    assert r["accepted"] == [a, c] and [(x["site_id"], x["reason"]) for x in r["rejected"]] == [(b, "site_failed")]
    assert r["quorum"] == {"min_sites": 2, "n_accepted": 2, "n_sites": 3, "met": True}
    assert {s: p["outcome"] for s, p in r["per_site"].items()} == {a: "accepted", b: "site_failed", c: "accepted"}
    for s in (a, c):
        assert _distill_charges(sites[s]) == [1]  # one charge for round 1, though it was asked twice
        again = np.load(out / "sites" / s / "synthetic.npz", allow_pickle=False)["images"]
        np.testing.assert_array_equal(again, released[s])
    assert r["n_merged"] == sum(len(released[s]) for s in (a, c))


def test_a_quorum_above_the_consortium_is_refused_before_any_site_pays(digits_consortium, capsys):
    coord = digits_consortium(name="too-many", min_sites=4)
    assert main(["coordinator", "run", str(coord)]) == RUNTIME_ERROR
    err = capsys.readouterr().err
    assert "min_sites" in err and "more than the 3 site(s)" in err
    for p in _sites(coord).values():
        assert not (load_site_config(p).output_dir / LEDGER_FILENAME).exists()
    doc = yaml.safe_load(coord.read_text())
    doc["min_sites"] = 0
    coord.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="min_sites"):
        load_coordinator_config(coord)


def test_silence_is_unavailable_when_the_superlink_lost_the_node_else_no_answer():
    code, why = silence(Error(code=ErrorCode.NODE_UNAVAILABLE, reason="Node Unavailable"), 30.0)
    assert code == Reason.SITE_UNAVAILABLE and "stopped reporting" in why
    code, why = silence(Error(code=ErrorCode.MESSAGE_UNAVAILABLE, reason="expired"), 30.0)
    assert code == Reason.NO_ANSWER and why == "no answer within 30 s (expired)"
    assert silence(None, 12.5) == (Reason.NO_ANSWER, "no answer within 12.5 s")


def test_flower_run_prints_why_the_coordinator_stopped_the_run(tmp_path):
    from rich.console import Console

    from medfdd.federation.flower.cli import _print_stopped

    run_json = tmp_path / "run.json"
    run_json.write_text(json.dumps({"status": "failed", "stopped": {
        "round": 2, "reason": "quorum not met: 1 of 3 site(s) accepted, min_sites is 2", "accepted": ["hospital-a"],
        "missing": {"hospital-b": "site_unavailable", "hospital-c": "no_answer"}}}))
    console = Console(record=True, width=300)
    _print_stopped(run_json, console)
    assert console.export_text().strip() == (
        "the coordinator stopped the run in round 2: quorum not met: 1 of 3 site(s) accepted, min_sites is 2; "
        "accepted: hospital-a; missing: hospital-b (site_unavailable), hospital-c (no_answer)")
    quiet = Console(record=True)
    _print_stopped(tmp_path / "absent.json", quiet)  # the run folder is on another machine: nothing to add
    assert quiet.export_text() == ""
