"""De-duplication never lets one patient's rows change another's (issue 36, item 5): duplicates are looked for only
within one patient (or within the pool of rows without a patient id), so neighbouring manifests stay neighbours."""

from __future__ import annotations

from collections import Counter

import pytest

from medfdd.config import load_site_config
from medfdd.data.site_data import load_site_data
from medfdd.site.check import check_report

PRIVACY = {"dp": True, "epsilon": 1.0, "delta": 1e-5, "accountant": "rdp"}


def _load(cfg_path):
    cfg = load_site_config(cfg_path)
    return cfg, load_site_data(cfg)


def _patient(s, data, pid: str) -> tuple[set[str], set[str]]:
    """(patient `pid`'s used scans, the scans it contributes to training), as manifest paths."""
    path = {i: s.rows[row - 2][0] for i, row in enumerate(data.rows.tolist())}  # line 1 is the header
    used = {path[i] for i in range(len(data.rows)) if data.patient_ids[i] == pid}
    return used, {path[i] for i in data.train.tolist() if data.patient_ids[i] == pid}


@pytest.mark.parametrize("how", ["byte_copy", "same_file", "relabelled_copy"])
def test_adding_a_patient_who_duplicates_a_scan_leaves_the_other_patients_records(site_builder, how):
    """P is listed first with Q's chosen scan (a byte copy, the same file, or a copy under another label): Q's
    surviving records and the scan Q contributes under `privacy.unit: patient` are what they were without P."""
    s = site_builder(holdout_fraction=0.0)
    q_files = [s.add_dicom(f"q{k}.dcm", "a", patient_id="Q") for k in range(3)]
    s.add_dicom("r.dcm", "b", patient_id="R")
    privacy = {**PRIVACY, "unit": "patient"}
    cfg_path = s.write(privacy=privacy)
    _, before = _load(cfg_path)
    q_used, (q_chosen,) = _patient(s, before, "Q")
    assert q_used == {"q0.dcm", "q1.dcm", "q2.dcm"}

    src = q_files[[f.name for f in q_files].index(q_chosen)]
    if how == "same_file":
        s.add(q_chosen, "a", "P")
    else:
        s.add_copy(src, "p.dcm", "b" if how == "relabelled_copy" else "a", "P")
    s.rows.insert(0, s.rows.pop())  # P's row comes before Q's
    cfg, after = _load(s.write(privacy=privacy))
    assert _patient(s, after, "Q") == (q_used, {q_chosen})
    assert len(_patient(s, after, "P")[0]) == 1  # P's copy is its own record, not a reason to drop Q's
    assert after.shared_content and not after.quarantine
    assert any("more than one patient" in w and "group of up to 2" in w for w in check_report(cfg, after).warnings)


def test_duplicates_within_one_patient_are_still_removed(site_builder):
    s = site_builder(holdout_fraction=0.0)
    first = s.add_dicom("q0.dcm", "a", patient_id="Q")
    s.add_copy(first, "q0_again.dcm", "a", "Q")
    other = s.add_dicom("q1.dcm", "a", patient_id="Q")
    s.add_copy(other, "q1_relabelled.dcm", "b", "Q")
    _, data = _load(s.write(privacy={**PRIVACY, "unit": "patient"}))
    assert _patient(s, data, "Q")[0] == {"q0.dcm"}
    assert sorted(q.path for q in data.quarantine) == ["q0_again.dcm", "q1.dcm", "q1_relabelled.dcm"]
    assert {str(q.reason) for q in data.quarantine} == {"duplicate_row"}
    assert not data.shared_content


def _records(s, data) -> Counter:
    """The (image bytes, label) records a site trains on or holds out, as a multiset."""
    return Counter((data.images[i].tobytes(), int(data.labels[i])) for i in range(len(data.labels)))


def test_rows_without_patient_ids_change_the_records_by_at_most_one(site_builder):
    """Under `privacy.unit: scan` each row is a record: a copy with the same label adds nothing, a copy under
    another label quarantines both (removes one record); either way neighbouring manifests give records at
    distance at most one."""
    s = site_builder(holdout_fraction=0.0)
    files = [s.add_dicom(f"x{k}.dcm", "ab"[k % 2]) for k in range(3)]
    cfg_path = s.write(privacy=PRIVACY)
    _, base = _load(cfg_path)
    for label, removed in (("a", 0), ("b", 1)):  # x0 is labelled "a"
        s.add_copy(files[0], f"copy_{label}.dcm", label)
        s.rows.insert(0, s.rows.pop())
        _, data = _load(s.write(privacy=PRIVACY))
        diff = _records(s, base) - _records(s, data)
        assert sum(diff.values()) == removed and not _records(s, data) - _records(s, base)
        s.rows.pop(0)
