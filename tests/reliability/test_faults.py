"""Faults: processes killed with SIGKILL at chosen moments, sites that fail or stay silent, full or blocked disks.

Moments are detected by polling the files the process writes (no fixed sleeps). After each fault the ledger holds at
least what a complete run would have charged (never under-counts) and a rerun finishes without a second charge.
"""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml
from reliability_helpers import tiny_consortium
from rich.console import Console

from medfdd import exit_codes
from medfdd.artifacts import load_synthetic
from medfdd.cli import main
from medfdd.config import load_coordinator_config, load_site_config
from medfdd.federation.inprocess import open_inprocess, run_inprocess
from medfdd.io import OutputWriteError
from medfdd.site.budget import provision_noise_key
from medfdd.site.distill import distill_site
from medfdd.site.noise_key import KEY_FILENAME
from medfdd.site.offer import make_offer
from privacy.accounting import LedgerWriteError, PrivacyLedger

pytestmark = pytest.mark.slow  # scheduled first (tests/conftest.py)

EXE = Path(sys.executable).with_name("medfdd")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
DEADLINE_S = 180.0
STEPS = 120


def _console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=200), buf


def _entries(path: Path) -> list[dict]:
    try:
        return json.loads(path.read_text())["entries"]
    except (OSError, ValueError, KeyError):
        return []


def kill_when(argv: list[str], ready: Callable[[], bool], *, log: Path) -> int:
    """Start `argv`, poll `ready()` until true (deadline), SIGKILL the process; returns its exit code (-9 if killed)."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
    try:
        deadline = time.monotonic() + DEADLINE_S
        while not ready():
            if proc.poll() is not None:
                raise AssertionError(f"{argv} ended (rc {proc.returncode}) before the moment came:\n"
                                     + log.read_text(errors="replace")[-3000:])
            if time.monotonic() > deadline:
                raise AssertionError(f"the moment did not come within {DEADLINE_S} s")
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
        return proc.wait()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()


# ------------------------------------------------------------------------------------------ a site killed mid-round


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from medfdd.prepare.consortium import prepare_consortium

    out = tmp_path_factory.mktemp("faults") / "c"
    prepare_consortium(source="digits", out=out, sites=2, alpha=1.0, fmt="dicom", seed=0, epsilon=1.0, delta=1e-5,
                       ipc=2, iterations=STEPS, rounds=1, method="dm", dp=True, max_per_class=30, console=Console(quiet=True))
    return out


def site_config(prepared: Path, folder: Path, **distill) -> Path:
    cfg = yaml.safe_load((prepared / "site_configs" / "hospital-a.yaml").read_text())
    cfg["data"]["root"] = str((prepared / "hospital-a").resolve())
    cfg["output"] = str(folder / "out")
    cfg["device"] = "cpu"
    cfg["distill"].update({"width": 8, "batch_size": 64, "checkpoint_every": 10, "iterations": STEPS, **distill})
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "site.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def uninterrupted(prepared, tmp_path_factory):
    """The same site distilled without a fault: what every resumed run must reproduce (with its noise key)."""
    path = site_config(prepared, tmp_path_factory.mktemp("straight"))
    distill_site(load_site_config(path), console=Console(quiet=True))
    cfg = load_site_config(path)
    return (load_synthetic(cfg.output_dir), PrivacyLedger.load(cfg.output_dir / "privacy_ledger.json"),
            (cfg.output_dir / KEY_FILENAME).read_bytes())


# moment -> (what is polled, description of the state when killed)
SITE_KILLS = {
    "after the ledger charge": (lambda out: [e["purpose"] for e in _entries(out / "privacy_ledger.json")
                                             ].count("distill") == 1,
                                "the ledger entry is on disk, no step has been checkpointed"),
    "mid-run after a checkpoint": (lambda out: (out / "checkpoints" / "round-1.safetensors").is_file(),
                                   "a resumable checkpoint exists, the artifact does not"),
    "during artifact writing": (lambda out: (out / "synthetic.npz").is_file(),
                                "synthetic.npz is written; synthetic.json, preview or clean-up may not be"),
}
SITE_KILL_OUTCOME = ("ledger holds the full planned charge (never under-counts); the rerun resumes, adds no "
                     "second charge and writes the artifact an uninterrupted run writes")


@pytest.mark.parametrize("moment", list(SITE_KILLS))
def test_site_killed_with_sigkill_resumes_without_a_second_charge(prepared, uninterrupted, tmp_path, moment):
    ready, _ = SITE_KILLS[moment]
    path = site_config(prepared, tmp_path)
    out = load_site_config(path).output_dir
    straight_syn, straight_ledger, key = uninterrupted
    provision_noise_key(load_site_config(path), key)  # the same site: the same secret noise key
    rc = kill_when([str(EXE), "site", "distill", str(path)], lambda: ready(out), log=tmp_path / "distill.log")
    assert rc == -signal.SIGKILL

    after_kill = PrivacyLedger.load(out / "privacy_ledger.json")
    (entry,) = [e for e in after_kill.entries if e.purpose == "distill"]  # and the DP record count before it
    assert entry.steps == STEPS  # every planned step was paid for before the first one ran
    assert after_kill.epsilon_spent == pytest.approx(straight_ledger.epsilon_spent)
    # nothing half-written is visible: a SIGKILL mid-write can leave a hidden `.NAME.*.tmp` (never read), but every
    # visible file is complete
    assert not [f for f in out.rglob("*.tmp") if not f.name.startswith(".")]
    if (out / "synthetic.json").is_file():
        json.loads((out / "synthetic.json").read_text())
    ckpt = out / "checkpoints" / "round-1.safetensors"
    from safetensors import safe_open

    at = 0
    if ckpt.is_file():
        with safe_open(str(ckpt), framework="pt") as f:
            at = int(f.metadata()["iteration"])
    if moment == "after the ledger charge":
        assert not (out / "synthetic.npz").exists()
    if moment == "mid-run after a checkpoint":
        assert at > 0 and not (out / "synthetic.npz").exists()
    if moment == "during artifact writing":
        with np.load(out / "synthetic.npz", allow_pickle=False) as z:  # never torn: complete or absent
            assert z["images"].shape == straight_syn.images.shape

    console, log = _console()
    resumed = distill_site(load_site_config(path), console=console)
    assert resumed.resumed_from == at
    if at:
        assert f"resuming round 1 from step {at}/" in log.getvalue()
    final = PrivacyLedger.load(out / "privacy_ledger.json")
    assert [e.to_json() for e in final.entries] == [e.to_json() for e in after_kill.entries]  # no second charge
    syn = load_synthetic(out)
    np.testing.assert_allclose(syn.images, straight_syn.images, atol=1e-5)
    assert np.array_equal(syn.labels, straight_syn.labels)
    assert syn.meta["epsilon"] == pytest.approx(straight_syn.meta["epsilon"])
    assert not ckpt.exists()


# ------------------------------------------------------------------------------------------ the coordinator killed

# faults with a test of their own below: name -> (what is injected, expected outcome, test)
FAULTS = {
    "coordinator SIGKILLed mid-round": (
        "`medfdd coordinator run` (2 rounds) killed as soon as round 1's checkpoint.json appears",
        "rerun resumes after round 1 (not redone) and completes; every site charged once per round",
        "test_coordinator_killed_after_round_one_resumes_from_its_checkpoint"),
    "coordinator killed between the new model and its checkpoint": (
        "round 2's global_model.safetensors written at the top level, checkpoint.json still after round 1",
        "the resumed round 2 broadcasts round 1's model (rounds/round-1), the one the sites paid against",
        "test_a_coordinator_killed_before_its_checkpoint_broadcasts_the_previous_rounds_model"),
    "site never answers (in-process)": (
        "one of two sites sends no offer in a round",
        "recorded as `no_answer`; the round merges the other site",
        "test_a_site_that_never_answers_is_left_out_of_the_round"),
    "a file where the output folder should be": (
        "`output` is an existing file (with and without the preprocessing cache)",
        "`medfdd site distill` exits 3 with OutputWriteError naming the path; no traceback; scans not blamed",
        "test_a_file_where_the_output_folder_should_be_is_a_typed_error"),
    "disk full at the atomic rename": (
        "OSError(ENOSPC) from os.replace in medfdd.io",
        "OutputWriteError (also an OSError) naming the file and the fix; old file byte-identical; no temp file",
        "test_failed_atomic_write_raises_a_typed_error_and_keeps_the_old_file"),
}


def test_coordinator_killed_after_round_one_resumes_from_its_checkpoint(tmp_path):
    coord = tiny_consortium(tmp_path / "killed", rounds=2)
    out = load_coordinator_config(coord).output_dir
    rc = kill_when([str(EXE), "coordinator", "run", str(coord)], lambda: (out / "checkpoint.json").is_file(),
                   log=tmp_path / "coordinator.log")
    assert rc == -signal.SIGKILL
    ckpt = json.loads((out / "checkpoint.json").read_text())
    assert [h["round"] for h in ckpt["history"]] == [1]

    console, log = _console()
    run_inprocess(load_coordinator_config(coord), console=console)
    assert "resuming" in log.getvalue() and "after round 1 of 2" in log.getvalue()
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "completed" and [r["round"] for r in run["rounds"]] == [1, 2]
    assert run["rounds"][0] == ckpt["history"][0]  # round 1 was not redone
    for p in load_coordinator_config(coord).site_paths:
        ledger = PrivacyLedger.load(load_site_config(p).output_dir / "privacy_ledger.json")
        assert sorted(e.round for e in ledger.entries if e.purpose == "distill") == [1, 2]  # one charge per round, also for a re-asked round


def test_a_coordinator_killed_before_its_checkpoint_broadcasts_the_previous_rounds_model(tmp_path):
    """Round 2 wrote the top-level global_model.safetensors, then died before checkpoint.json: the resumed round 2
    must broadcast round 1's model again (the sites already paid against it), not round 2's unfinished one."""
    coord = tiny_consortium(tmp_path / "torn", rounds=3)
    console, _ = _console()
    run = open_inprocess(load_coordinator_config(coord), console=console)
    b = run.broadcast()
    for p in load_coordinator_config(coord).site_paths:
        assert run.receive(make_offer(load_site_config(p), b, console=console), sender=load_site_config(p).site_id)
    run.finish_round()
    round_one = (run.out / "rounds" / "round-1" / "global_model.safetensors").read_bytes()
    (run.out / "global_model.safetensors").write_bytes(b"round 2's model, written just before the kill")

    resumed = open_inprocess(load_coordinator_config(coord), console=console)
    b = resumed.broadcast()
    assert b.round == 2 and b.model == round_one


def test_a_site_that_never_answers_is_left_out_of_the_round(tmp_path):
    """In-process the engine calls each site; a silent one (here: never called) is recorded as no_answer."""
    coord = tiny_consortium(tmp_path / "silent")
    sites = {load_site_config(p).site_id: p for p in load_coordinator_config(coord).site_paths}
    a, b = sorted(sites)
    console, log = _console()
    run = open_inprocess(load_coordinator_config(coord), console=console)
    assert run.receive(make_offer(load_site_config(sites[a]), run.broadcast(), console=console), sender=a)
    h = run.finish_round()
    assert h["accepted"] == [a] and [(x["site_id"], x["reason"]) for x in h["rejected"]] == [(b, "no_answer")]
    assert f"no offer from '{b}'" in log.getvalue()


# ------------------------------------------------------------------------------------------ disks


def fail_replace(monkeypatch, name: str, err: int) -> None:
    real = os.replace

    def replace(src, dst, *a, **kw):
        if Path(dst).name == name:
            raise OSError(err, os.strerror(err))
        return real(src, dst, *a, **kw)

    monkeypatch.setattr(os, "replace", replace)


def fail_create(monkeypatch, name: str, err: int) -> None:
    real = tempfile.mkstemp

    def mkstemp(*a, prefix=None, **kw):
        if prefix == f".{name}.":
            raise OSError(err, os.strerror(err))
        return real(*a, prefix=prefix, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


@pytest.fixture
def two_round_site(prepared, tmp_path):
    """A site that finished round 1 of 2; returns (config path, output folder, bytes of its files)."""
    path = site_config(prepared, tmp_path, iterations=4, checkpoint_every=2)
    cfg = yaml.safe_load(path.read_text())
    cfg["privacy"]["rounds"] = 2
    path.write_text(yaml.safe_dump(cfg))
    distill_site(load_site_config(path), console=Console(quiet=True))
    out = load_site_config(path).output_dir
    return path, out, {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


DISK_FAULTS = {
    "disk full while writing synthetic.npz": (
        "synthetic.npz", errno.ENOSPC, fail_replace, OutputWriteError, "free space",
        "OutputWriteError names synthetic.npz; round 1's artifact byte-identical; no temp file; the round-2 charge "
        "stays (over-count allowed); a rerun completes without a second charge"),
    "read-only output when the ledger is charged": (
        "privacy_ledger.json", errno.EROFS, fail_create, LedgerWriteError, "release nothing",
        "LedgerWriteError names the ledger; ledger and artifact byte-identical; nothing released; a rerun charges "
        "once and completes"),
}


@pytest.mark.parametrize("fault", list(DISK_FAULTS))
def test_write_failure_is_typed_and_leaves_earlier_files_intact(two_round_site, monkeypatch, fault):
    name, err, inject, error, fix, _ = DISK_FAULTS[fault]
    path, out, before = two_round_site
    inject(monkeypatch, name, err)
    with pytest.raises(error) as e:
        distill_site(load_site_config(path), round_=2, console=Console(quiet=True))
    assert str(out / name) in str(e.value) and fix in str(e.value) and "Fix:" in str(e.value)
    assert (out / "synthetic.npz").read_bytes() == before["synthetic.npz"]
    assert (out / "synthetic.json").read_bytes() == before["synthetic.json"]
    assert not list(out.rglob("*.tmp"))
    charged = [e.round for e in PrivacyLedger.load(out / "privacy_ledger.json").entries if e.purpose == "distill"]
    if name == "privacy_ledger.json":
        assert (out / name).read_bytes() == before[name] and charged == [1]
    else:
        assert charged == [1, 2]  # write-ahead: the charge came first (may over-count, never under-count)
    monkeypatch.undo()
    outcome = distill_site(load_site_config(path), round_=2, console=Console(quiet=True))
    assert outcome.meta["round"] == 2
    assert [e.round for e in PrivacyLedger.load(out / "privacy_ledger.json").entries if e.purpose == "distill"] == [1, 2]


def test_a_file_where_the_output_folder_should_be_is_a_typed_error(prepared, tmp_path, capsys):
    path = site_config(prepared, tmp_path, iterations=2)
    blocker = load_site_config(path).output_dir
    blocker.write_text("not a folder")
    for cache in (True, False):  # the preprocessing cache is written first; without it, the ledger
        cfg = yaml.safe_load(path.read_text())
        cfg["data"]["cache"] = cache
        path.write_text(yaml.safe_dump(cfg))
        assert main(["site", "distill", str(path)]) == exit_codes.RUNTIME_ERROR
        err = capsys.readouterr().err
        assert "Traceback" not in err and str(blocker) in err.replace("\n", "") and "in the way" in err
        assert "training split is empty" not in err  # not blamed on the scans
    assert blocker.read_text() == "not a folder"


def test_failed_atomic_write_raises_a_typed_error_and_keeps_the_old_file(tmp_path, monkeypatch):
    from medfdd.io import atomic_write_json

    target = atomic_write_json(tmp_path / "run.json", {"round": 1})
    old = target.read_bytes()
    fail_replace(monkeypatch, "run.json", errno.ENOSPC)
    with pytest.raises(OutputWriteError) as e:
        atomic_write_json(target, {"round": 2})
    assert isinstance(e.value, OSError) and e.value.errno == errno.ENOSPC
    assert e.value.where == str(target) and "ENOSPC" in e.value.problem and "free space" in e.value.fix
    assert target.read_bytes() == old and [p.name for p in tmp_path.iterdir()] == ["run.json"]
