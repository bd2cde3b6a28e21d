"""Flower deployment engine on loopback: a real SuperLink and three SuperNodes with TLS and SuperNode authentication.

One deployment per module (its own FLWR_HOME, certificates, keys and free ports under a fresh tmp folder), started
with the documented commands: `medfdd coordinator superlink` and `medfdd site join` (both exec Flower's own process,
so the PID we hold is the SuperLink's / SuperNode's), `medfdd coordinator register` and `flower-run`. Every process is started in its own process group
and stopped by PID in the fixture's teardown, also when a test fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from conftest import assert_final_model_delivered, small_digits_consortium
from flower_loopback import HOST, Deployment, flower_coordinator_config, tail
from rich.console import Console

from medfdd.config import load_coordinator_config, load_site_config
from medfdd.exit_codes import RUNTIME_ERROR
from medfdd.federation.flower import deploy
from medfdd.federation.flower.pki import make_site_keys, make_tls
from medfdd.federation.inprocess import run_inprocess
from medfdd.site.budget import provision_noise_key
from medfdd.site.noise_key import KEY_FILENAME

pytestmark = pytest.mark.slow  # scheduled first (tests/conftest.py)
SITE_TIMEOUT_S = 240.0
SILENT_TIMEOUT_S = 45.0


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, shared_preprocess_cache):
    base = tmp_path_factory.mktemp("flower")
    coord = small_digits_consortium(base / "consortium", rounds=2, site_timeout_s=SITE_TIMEOUT_S,
                                    cache_dir=shared_preprocess_cache)
    sites = {load_site_config(p).site_id: p for p in load_coordinator_config(coord).site_paths}
    d = Deployment(base)
    d.coord, d.sites = coord, sites
    tls = make_tls(base / "certs")
    d.ca = tls.ca_cert
    d.keys = {s: make_site_keys(base / "keys", s) for s in sites}
    mp = pytest.MonkeyPatch()
    mp.setenv("FLWR_HOME", d.env["FLWR_HOME"])  # the medfdd CLI's flwr calls use this test's FLWR_HOME
    try:
        d.start("superlink", [sys.executable, "-m", "medfdd.cli", "coordinator", "superlink", "--certs",
                              str(base / "certs"), "--host", HOST, "--port", str(d.port)])
        deploy.wait_for_port(HOST, d.port, timeout=60, proc=d.procs["superlink"])
        for s, keys in d.keys.items():
            assert d.cli("coordinator", "register", str(keys.public_key)) == 0
            d.join(s, sites[s], keys.private_key)
        d.wait_online(len(sites))
        yield d
    finally:
        d.stop_all()
        mp.undo()
        for name, proc in d.procs.items():
            assert proc.poll() is not None, f"{name} (pid {proc.pid}) still running"


@pytest.fixture(scope="module")
def flower_run(deployment):
    d = deployment
    cfg = flower_coordinator_config(d.coord, "flower")
    t0 = time.perf_counter()
    rc = d.cli("coordinator", "flower-run", str(cfg), "--timeout", "600")
    seconds = time.perf_counter() - t0
    assert rc == 0, f"flower-run exited {rc}\n{d.log_tails()}"
    out = load_coordinator_config(cfg).output_dir
    print(f"Flower run, 3 sites x 2 rounds, TLS + SuperNode auth: {seconds:.1f} s")
    return out, seconds


def test_two_round_run_over_tls_with_supernode_auth_completes(deployment, flower_run):
    out, _ = flower_run
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed" and run["engine"] == "flower"
    sites = sorted(deployment.sites)
    assert [r["round"] for r in run["rounds"]] == [1, 2]
    model_bytes = (out / "rounds" / "round-1" / "global_model.safetensors").stat().st_size
    for r in run["rounds"]:
        assert r["accepted"] == sites and r["rejected"] == []
        assert 0 <= r["metrics"]["accuracy"] <= 1 and 0 <= r["metrics"]["auc"] <= 1
        assert all(r["bytes_up"][s] > 50 * 16 * 16 * 4 for s in sites)
    assert all(run["rounds"][1]["bytes_down"][s] > model_bytes for s in sites)  # round 2 carries the global model
    assert run["final"]["accuracy"] == run["rounds"][1]["metrics"]["accuracy"]
    assert run["final"]["bytes_up_total"] == sum(sum(r["bytes_up"].values()) for r in run["rounds"])
    # the ledgers stay at the sites: each paid once per round; none was copied to the coordinator
    for s, path in deployment.sites.items():
        ledger = json.loads((load_site_config(path).output_dir / "privacy_ledger.json").read_text())
        assert sorted(e["round"] for e in ledger["entries"] if e["purpose"] == "distill") == [1, 2]
        assert not (out / "sites" / s / "privacy_ledger.json").exists()
    # after the last round every SuperNode received the final model, kept it and scored it at the site
    assert_final_model_delivered(out, deployment.sites)


def test_unregistered_supernode_is_refused(deployment, flower_run):
    d = deployment
    rogue_keys = make_site_keys(d.base / "rogue-keys", "hospital-a")  # claims a real site's id, key not registered
    before = {n["node-id"] for n in deploy.list_supernodes(env=d.env)}
    proc = d.join("rogue", next(iter(d.sites.values())), rogue_keys.private_key)
    try:
        rc = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"an unregistered SuperNode was not refused within 60 s\n{tail(d.logs / 'rogue.log')}")
    assert rc != 0
    assert "Failed to activate SuperNode" in (d.logs / "rogue.log").read_text(errors="replace")
    assert {n["node-id"] for n in deploy.list_supernodes(env=d.env)} == before


def test_flower_and_inprocess_runs_give_the_same_merged_set_and_accuracy(deployment, flower_run):
    out, flower_s = flower_run
    d = deployment
    # the same consortium, site outputs of its own: every site starts from an empty ledger, as under Flower, and
    # holds the same secret noise key as its Flower SuperNode (the same hospital)
    inproc_dir = d.coord.parent.parent / "site_configs_inprocess"
    inproc_dir.mkdir()
    for path in d.sites.values():
        cfg = yaml.safe_load(path.read_text())
        cfg["output"] = cfg["output"].replace("../runs/", "../runs-inprocess/")
        (inproc_dir / path.name).write_text(yaml.safe_dump(cfg, sort_keys=False))
        key = load_site_config(path).output_dir / KEY_FILENAME
        provision_noise_key(load_site_config(inproc_dir / path.name), key.read_bytes())
    coord = yaml.safe_load(d.coord.read_text())
    coord["output"] = "../runs-inprocess/coordinator"
    (inproc_dir / d.coord.name).write_text(yaml.safe_dump(coord, sort_keys=False))
    t0 = time.perf_counter()
    inproc_out = run_inprocess(load_coordinator_config(inproc_dir / d.coord.name), console=Console(quiet=True))
    print(f"in-process run, 3 sites x 2 rounds: {time.perf_counter() - t0:.1f} s (Flower: {flower_s:.1f} s)")

    with np.load(out / "merged.npz", allow_pickle=False) as f, \
            np.load(inproc_out / "merged.npz", allow_pickle=False) as i:
        np.testing.assert_array_equal(f["labels"], i["labels"])
        np.testing.assert_allclose(f["images"], i["images"], rtol=0, atol=1e-6)
    fl = json.loads((out / "run.json").read_text())
    ip = json.loads((inproc_out / "run.json").read_text())
    assert ip["engine"] == "inprocess"
    assert fl["final"]["accuracy"] == pytest.approx(ip["final"]["accuracy"], abs=1e-6)
    assert fl["final"]["n_merged"] == ip["final"]["n_merged"]
    assert [r["accepted"] for r in fl["rounds"]] == [r["accepted"] for r in ip["rounds"]]


def test_a_site_that_never_answers_is_left_out_after_the_timeout(deployment, flower_run):
    d = deployment
    silent = sorted(d.sites)[-1]
    cfg = flower_coordinator_config(d.coord, "silent", rounds=1, site_timeout_s=SILENT_TIMEOUT_S)
    proc = d.procs[silent]
    os.killpg(proc.pid, signal.SIGSTOP)  # the hospital's machine freezes: connected, registered, silent
    try:
        t0 = time.perf_counter()
        rc = d.cli("coordinator", "flower-run", str(cfg), "--timeout", "300")
        seconds = time.perf_counter() - t0
    finally:
        os.killpg(proc.pid, signal.SIGCONT)
    assert rc == 0, d.log_tails()
    print(f"run with one silent site (timeout {SILENT_TIMEOUT_S:g} s): {seconds:.1f} s")
    run = json.loads((load_coordinator_config(cfg).output_dir / "run.json").read_text())
    assert run["status"] == "completed"
    r = run["rounds"][0]
    assert r["accepted"] == sorted(set(d.sites) - {silent})
    # only the silent site: the SuperLink's own stand-in reply for its expired task names no `node-<id>` site
    assert {x["site_id"] for x in r["rejected"]} == {silent}
    assert seconds >= SILENT_TIMEOUT_S
    # the final model goes to the sites that answered the last round (a frozen one would cost another timeout)
    assert_final_model_delivered(load_coordinator_config(cfg).output_dir,
                                 {s: p for s, p in d.sites.items() if s != silent})


def test_a_failed_run_makes_flower_run_exit_non_zero(deployment, capsys):
    d = deployment
    cfg = flower_coordinator_config(d.coord, "foreign")
    out = load_coordinator_config(cfg).output_dir
    out.mkdir(parents=True)
    (out / "run.json").write_text("{}")  # a run folder the ServerApp refuses to touch: the run fails at its start
    assert d.cli("coordinator", "flower-run", str(cfg), "--timeout", "300") == RUNTIME_ERROR  # `flwr run` alone would exit 0
    err = capsys.readouterr().err
    assert "finished:failed" in err
