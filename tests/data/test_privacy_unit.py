"""`privacy.unit: patient`: one scan per training patient (contribution bounding), so that epsilon protects patients."""

from __future__ import annotations

import json

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from medfdd.config import load_site_config
from medfdd.data.site_data import load_site_data
from medfdd.data.split import one_scan_per_patient
from medfdd.site.check import check_site

rows = st.lists(st.tuples(st.integers(0, 12), st.booleans()), min_size=1, max_size=60)  # (patient, has id)


def _kept_paths(table, seed):
    pids = [f"P{p}" if has_id else None for p, has_id in table]
    paths = [f"scan{i}.dcm" for i in range(len(table))]  # paths name the scan, whatever rows come before it
    kept, unused = one_scan_per_patient(np.arange(len(table)), pids, paths, seed)
    return pids, paths, kept, unused


@settings(max_examples=80, deadline=None)
@given(table=rows, seed=st.integers(0, 5), drop=st.integers(0, 12))
def test_one_scan_per_patient_bounds_each_patient_and_neighbours_differ_by_one_record(table, seed, drop):
    pids, paths, kept, unused = _kept_paths(table, seed)
    assert sorted(np.r_[kept, unused].tolist()) == list(range(len(table)))  # a partition of the training rows
    named = [pids[i] for i in kept if pids[i] is not None]
    assert len(named) == len(set(named)) == len({p for p in pids if p is not None})  # exactly one per patient
    assert all(i in kept for i, p in enumerate(pids) if p is None)  # a row without id is its own patient
    # the neighbouring dataset without patient `drop`: every other patient contributes the same scan, so the
    # record-level guarantee on the kept scans is a patient-level one
    rest = [i for i, p in enumerate(pids) if p != f"P{drop}"]
    kept_rest, _ = one_scan_per_patient(np.arange(len(rest)), [pids[i] for i in rest], [paths[i] for i in rest],
                                        seed)
    before = {paths[i] for i in kept if pids[i] != f"P{drop}"}
    assert {paths[rest[j]] for j in kept_rest} == before


def _site(site_builder, n=30, per_patient=3, missing_id_rows=0):
    s = site_builder()
    rng = np.random.default_rng(5)
    for i in range(n):
        s.add_dicom(f"img{i}.dcm", "ab"[(i // per_patient) % 2], pixels=rng.integers(0, 255, (20, 20), dtype=np.uint8),
                    patient_id=f"P{i // per_patient}")
    for j in range(missing_id_rows):
        s.add_dicom(f"noid{j}.dcm", "a", pixels=rng.integers(0, 255, (20, 20), dtype=np.uint8))
    return s


def test_patient_unit_trains_on_one_scan_per_patient_and_reports_the_rest(site_builder):
    s = _site(site_builder, missing_id_rows=2)
    cfg_path = s.write(privacy={"dp": True, "epsilon": 1.0, "delta": 1e-5, "accountant": "rdp", "unit": "patient"})
    report = check_site(load_site_config(cfg_path))
    cfg = load_site_config(cfg_path)
    split = json.loads((cfg.output_dir / "split.json").read_text())
    row_pid = {i + 2: f"P{i // 3}" for i in range(30)}  # manifest line numbers start at 2
    train = [row_pid[r] for r in split["train_rows"]]
    assert split["privacy_unit"] == "patient" and len(train) == len(set(train))  # one scan per training patient
    unused = [row_pid[r] for r in split["unused_rows"]]
    assert len(unused) == 2 * len(train) and set(unused) == set(train)  # each training patient's other two scans
    hold = [row_pid[r] for r in split["holdout_rows"]]
    assert hold and not set(hold) & set(train) and len(hold) == 3 * len(set(hold))  # holdout keeps every scan
    assert report.n_unused == len(unused)
    # nothing silently dropped: the rows without a patient id are quarantined with the reason and the fix
    q = json.loads((cfg.output_dir / "quarantine.json").read_text())
    noid = [e for e in q["entries"] if e["reason"] == "no_patient_id"]
    assert [e["path"] for e in noid] == ["noid0.dcm", "noid1.dcm"] and "patient_id" in noid[0]["fix"]
    data = load_site_data(cfg)  # the arrays the distiller and the audit use agree with split.json
    assert sorted(data.rows[data.train].tolist()) == sorted(split["train_rows"])
    assert not set(data.unused.tolist()) & (set(data.train.tolist()) | set(data.holdout.tolist()))


def test_scan_unit_warns_when_patients_have_several_training_scans(site_builder):
    report = check_site(load_site_config(_site(site_builder).write()))
    warning = next(w for w in report.warnings if "privacy.unit" in w)
    assert "group" in warning and "privacy.unit: patient" in warning and "up to 3" in warning
    single = check_site(load_site_config(_site(site_builder, per_patient=1).write()))
    assert not any("privacy.unit" in w for w in single.warnings) and single.n_unused == 0
