"""DESIGN invariant 9: one charge buys one release of one data set, and a lost ledger is never a fresh budget.

Each test runs the real site runner (`distill_site`, and `medfdd site ...` in-process where the CLI's output matters)
on a copy of one prepared digits site, so a test may edit its scans and labels.csv in place.
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pydicom
import pytest
import yaml
from conftest import prepared_digits

from medfdd.cli import main
from medfdd.config import load_site_config
from medfdd.data.manifest import read_manifest
from medfdd.data.site_data import load_site_data
from medfdd.exit_codes import RUNTIME_ERROR
from medfdd.site import distill as site_runner
from medfdd.site.budget import provision_noise_key
from medfdd.site.distill import distill_site
from medfdd.site.noise_key import KEY_FILENAME
from privacy.accounting import ChargeConflict, LedgerMissing, PrivacyLedger

pytestmark = pytest.mark.slow  # scheduled first (tests/conftest.py)

RELEASE = ("synthetic.npz", "synthetic.json", "privacy_ledger.json", "checkpoints/released-round-1.safetensors")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepared_digits(tmp_path_factory.mktemp("cons") / "c", ipc=2, iterations=4)


@pytest.fixture
def site(prepared, tmp_path) -> Path:
    """A site config whose data folder is this test's own copy of hospital-a (preprocessing cache shared)."""
    shutil.copytree(prepared / "hospital-a", tmp_path / "data")
    cfg = yaml.safe_load((prepared / "site_configs" / "hospital-a.yaml").read_text())
    cfg["data"]["root"] = str(tmp_path / "data")
    cfg["data"]["cache_dir"] = str(prepared.parent / "preprocess-cache")  # content-addressed: copies hit it
    cfg["output"] = str(tmp_path / "out")
    cfg["distill"].update({"width": 8, "checkpoint_every": 2})
    path = tmp_path / "hospital-a.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def quiet():
    from rich.console import Console

    return Console(quiet=True)


def snapshot(path: Path) -> dict[str, bytes | None]:
    out = load_site_config(path).output_dir
    return {f: (out / f).read_bytes() if (out / f).is_file() else None for f in RELEASE}


def a_training_scan(path: Path) -> tuple[str, str]:
    """(manifest path, label) of a record in the training split."""
    cfg = load_site_config(path)
    data = load_site_data(cfg)
    entries, _ = read_manifest(cfg.data_root, cfg.data.manifest, cfg.data.classes)
    row = int(data.rows[data.train[0]])
    entry = next(e for e in entries if e.row == row)
    return entry.path, cfg.data.classes[entry.label]


def cli(capsys, *argv: str) -> tuple[int, str]:
    rc = main(list(argv))
    captured = capsys.readouterr()
    return rc, " ".join((captured.out + captured.err).split())  # rich wraps long lines


# ------------------------------------------------------------------------------ one charge, one release, one data set


def test_an_unchanged_rerun_resumes_and_replays_without_a_second_charge(site):
    distill_site(load_site_config(site), console=quiet(), stop_after=2)  # interrupted after the charge, a checkpoint left
    assert snapshot(site)["synthetic.npz"] is None
    resumed = distill_site(load_site_config(site), console=quiet())
    assert resumed.resumed_from == 2
    first = snapshot(site)
    distill_site(load_site_config(site), console=quiet())  # a replay of the charged round: the same release, byte for byte
    assert snapshot(site) == first
    count, entry = PrivacyLedger.load(load_site_config(site).output_dir).entries  # the DP record count, round 1
    assert (count.purpose, entry.purpose) == ("record-count", "distill")
    assert entry.release.count(",") == 6  # per-input tags: what changed can be named


def test_relabelling_a_training_scan_in_place_is_refused(site, capsys):
    distill_site(load_site_config(site), console=quiet())
    before = snapshot(site)
    rel, label = a_training_scan(site)
    manifest = load_site_config(site).data_root / "labels.csv"
    rows = list(csv.reader(manifest.open(newline="")))
    other = next(c for c in load_site_config(site).data.classes if c != label)
    rows = [[p, other if p == rel else lab, *rest] for p, lab, *rest in rows]
    with manifest.open("w", newline="") as f:
        csv.writer(f, lineterminator="\n").writerows(rows)
    with pytest.raises(ChargeConflict, match="labels") as e:
        distill_site(load_site_config(site), console=quiet())
    assert "content" not in e.value.problem and "--round 2" in e.value.fix
    assert snapshot(site) == before  # nothing released, nothing charged
    rc, text = cli(capsys, "site", "distill", str(site))
    assert rc == RUNTIME_ERROR and "training records' labels" in text and "new, paid round" in text
    assert snapshot(site) == before


def test_new_pixels_under_the_same_file_name_are_refused_even_on_resume(site):
    distill_site(load_site_config(site), console=quiet(), stop_after=2)  # charged, checkpointed, nothing released yet
    ckpt = load_site_config(site).output_dir / "checkpoints" / "round-1.safetensors"
    before, saved = snapshot(site), ckpt.read_bytes()
    rel, _ = a_training_scan(site)
    file = load_site_config(site).data_root / rel
    ds = pydicom.dcmread(file)
    pixels = ds.pixel_array
    ds.PixelData = (pixels.max() - pixels).astype(pixels.dtype).tobytes()  # the same scan file, other pixels
    ds.save_as(file)
    with pytest.raises(ChargeConflict, match="content") as e:
        distill_site(load_site_config(site), console=quiet())
    assert "labels" not in e.value.problem
    assert snapshot(site) == before and before["synthetic.npz"] is None  # no release from the old checkpoint
    assert ckpt.read_bytes() == saved


def test_another_device_or_precision_is_another_release(site, monkeypatch):
    distill_site(load_site_config(site), console=quiet())
    before = snapshot(site)
    resolved = site_runner._runtime

    def other_precision(cfg, device):
        return {**resolved(cfg, device), "precision": "bf16-elsewhere"}

    monkeypatch.setattr(site_runner, "_runtime", other_precision)
    with pytest.raises(ChargeConflict, match="device, precision"):
        distill_site(load_site_config(site), console=quiet())
    assert snapshot(site) == before


# ------------------------------------------------------------------------------ a lost ledger is never a fresh budget


def test_a_deleted_ledger_next_to_released_artifacts_is_refused(site, capsys):
    distill_site(load_site_config(site), console=quiet())
    out = load_site_config(site).output_dir
    ledger = (out / "privacy_ledger.json").read_bytes()
    before = snapshot(site)
    (out / "privacy_ledger.json").unlink()
    with pytest.raises(LedgerMissing) as e:
        distill_site(load_site_config(site), console=quiet())
    assert e.value.where == str(out / "privacy_ledger.json")
    assert "synthetic.npz" in e.value.problem and "released-round-1" in e.value.problem
    assert "backup" in e.value.fix and "new, empty folder" in e.value.fix
    assert not (out / "privacy_ledger.json").exists()  # no empty ledger was created
    assert {f: b for f, b in snapshot(site).items() if f != "privacy_ledger.json"} == {
        f: b for f, b in before.items() if f != "privacy_ledger.json"}
    rc, text = cli(capsys, "site", "budget", str(site))
    assert rc == RUNTIME_ERROR and "nothing spent" not in text and "ledger is missing" in text
    (out / "privacy_ledger.json").write_bytes(ledger)  # restored from the backup: the same site again
    distill_site(load_site_config(site), console=quiet())
    assert snapshot(site) == before


def test_a_key_without_its_ledger_is_refused_and_a_provisioned_key_is_not(site, capsys):
    """A noise key found without a ledger (the ledger deleted next to it, or a key copied into a folder it does not
    belong to) may already have been spent: refused. A key installed the supported way (`provision_noise_key`: the
    empty ledger first) starts a fresh budget."""
    cfg = load_site_config(site)
    out = cfg.output_dir
    out.mkdir(parents=True)
    (out / KEY_FILENAME).write_bytes(bytes(range(32)))
    rc, text = cli(capsys, "site", "budget", str(site))
    assert rc == RUNTIME_ERROR and "nothing spent" not in text and "ledger is missing" in text and KEY_FILENAME in text
    with pytest.raises(LedgerMissing, match=KEY_FILENAME):
        distill_site(load_site_config(site), console=quiet())
    assert not (out / "privacy_ledger.json").exists()
    (out / KEY_FILENAME).unlink()
    provision_noise_key(cfg, bytes(range(32)))
    rc, text = cli(capsys, "site", "budget", str(site))
    assert rc == 0 and "spent 0 of 1" in text
    distill_site(load_site_config(site), console=quiet())
    assert PrivacyLedger.load(out).epsilon_spent > 0 and (out / KEY_FILENAME).read_bytes() == bytes(range(32))


def test_the_ledger_refuses_to_start_empty_next_to_a_trace(tmp_path):
    trace = tmp_path / "checkpoints" / "round-1.safetensors"
    trace.parent.mkdir()
    trace.write_bytes(b"x")
    with pytest.raises(LedgerMissing, match="round-1.safetensors"):
        PrivacyLedger.open(tmp_path, site_id="a", epsilon=1.0, delta=1e-5, traces=[trace])
    assert not (tmp_path / "privacy_ledger.json").exists()
    trace.unlink()
    assert PrivacyLedger.open(tmp_path, site_id="a", epsilon=1.0, delta=1e-5, traces=[trace]).epsilon_spent == 0
