"""Broken site inputs: each lands in quarantine.json with its reason, or raises a typed error; counts reconcile."""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel
import numpy as np
import pytest
from pydicom.data import get_testdata_file

from medfdd import exit_codes
from medfdd.cli import main
from medfdd.config import load_site_config
from medfdd.errors import ConfigError, ManifestError, NoUsableDataError
from medfdd.prepare.writers import write_dicom, write_nifti
from medfdd.site.check import check_site


def quarantine(cfg_path: Path) -> dict:
    cfg = load_site_config(cfg_path)
    return json.loads((cfg.output_dir / "quarantine.json").read_text())


def reason_of(q: dict, rel: str) -> str:
    hits = [e["reason"] for e in q["entries"] if e["path"] == rel]
    assert len(hits) == 1, f"{rel}: {hits}"
    return hits[0]


# manifest path -> (kind of bad input, expected quarantine reason); the files are written by the test below
QUARANTINED = {
    "truncated.dcm": ("truncated DICOM (pixel data cut)", "corrupt_pixel_data"),
    "cut_header.dcm": ("DICOM cut in the middle of its header", "no_pixel_data"),
    "random.dcm": ("random bytes with a .dcm suffix", "not_dicom"),
    "empty.dcm": ("zero-byte file", "empty_file"),
    "rtplan.dcm": ("DICOM without pixels (RT plan)", "no_pixel_data"),
    "jpegls.dcm": ("JPEG-LS compressed DICOM without a decoder", "unsupported_compression"),
    "bomb.dcm": ("DICOM header announcing 60000 x 60000 x 1000 frames (bomb guard)", "too_large"),
    "nan.nii.gz": ("NIfTI with a NaN voxel", "non_finite"),
    "inf.nii.gz": ("NIfTI with Inf voxels", "non_finite"),
    "const.nii.gz": ("all-constant NIfTI", "constant_image"),
    "vol.nii.gz": ("3D volume where the site expects 2D", "wrong_dimensionality"),
    "4d.nii": ("4D NIfTI (nibabel's functional.nii) where the site expects 2D", "wrong_dimensionality"),
    "unknown_label.dcm": ("label not in the consortium's classes", "unknown_label"),
    "missing.dcm": ("manifest row for a file that does not exist", "missing_file"),
    "../outside.dcm": ("`../` path", "outside_root"),
    "/etc/passwd": ("absolute path", "outside_root"),
    "escape.dcm": ("symlink escaping the data root", "outside_root"),
    "": ("empty path field", "empty_path"),
    "notimage.txt": ("text file with no image suffix", "unreadable"),
}


def test_broken_files_are_quarantined_with_reasons(site_builder, tmp_path):
    s = site_builder(classes=["a", "b"], spatial_size=[16, 16])
    rng = np.random.default_rng(1)
    for i in range(4):
        s.add_dicom(f"ok/{i}.dcm", "ab"[i % 2], patient_id=f"P{i}")
    good = s.root / "ok" / "0.dcm"
    # truncated DICOM: header intact, pixel data cut
    data = good.read_bytes()
    (s.root / "truncated.dcm").write_bytes(data[: len(data) - 100])
    s.add("truncated.dcm", "a")
    # header cut in the middle
    (s.root / "cut_header.dcm").write_bytes(data[:200])
    s.add("cut_header.dcm", "a")
    (s.root / "random.dcm").write_bytes(rng.bytes(4096))
    s.add("random.dcm", "a")
    (s.root / "empty.dcm").write_bytes(b"")
    s.add("empty.dcm", "a")
    s.add_copy(Path(get_testdata_file("rtplan.dcm")), "rtplan.dcm", "a")
    s.add_copy(Path(get_testdata_file("MR_small_jpeg_ls_lossless.dcm")), "jpegls.dcm", "b")
    s.add_dicom("bomb.dcm", "a", pixels=np.zeros((16, 16), np.uint8))
    # announce an absurd size in the header without the pixels (decompression-bomb guard)
    import pydicom

    ds = pydicom.dcmread(s.root / "bomb.dcm")
    ds.Rows, ds.Columns, ds.NumberOfFrames = 60000, 60000, 1000
    ds.save_as(s.root / "bomb.dcm")
    nan = np.ones((16, 16), np.float32)
    nan[3, 3] = np.nan
    write_nifti(s.root / "nan.nii.gz", nan)
    s.add("nan.nii.gz", "a")
    write_nifti(s.root / "inf.nii.gz", np.where(np.eye(16) > 0, np.inf, 1).astype(np.float32))
    s.add("inf.nii.gz", "a")
    write_nifti(s.root / "const.nii.gz", np.full((16, 16), 7, np.int16))
    s.add("const.nii.gz", "b")
    write_nifti(s.root / "vol.nii.gz", rng.random((4, 16, 16)).astype(np.float32))
    s.add("vol.nii.gz", "b")
    s.add_copy(Path(nibabel.__file__).parent / "tests/data/functional.nii", "4d.nii", "b")
    s.add_dicom("unknown_label.dcm", "zebra")
    s.add("missing.dcm", "a")
    s.add("../outside.dcm", "a")
    s.add("/etc/passwd", "a")
    outside = tmp_path / "elsewhere.dcm"
    write_dicom(outside, np.ones((4, 4), np.uint8), patient_id="X", rng=rng)
    os.symlink(outside, s.root / "escape.dcm")
    s.add("escape.dcm", "a")
    s.add("ok/1.dcm", "b", "P1")  # duplicate row of the same patient, same label
    s.add("", "a")
    (s.root / "notimage.txt").write_text("hello")
    s.add("notimage.txt", "a")
    cfg_path = s.write()

    report = check_site(load_site_config(cfg_path))
    q = quarantine(cfg_path)
    expected = {rel: reason for rel, (_, reason) in QUARANTINED.items()}
    for rel, reason in expected.items():
        assert reason_of(q, rel) == reason, rel
    dup = [e for e in q["entries"] if e["reason"] == "duplicate_row"]
    assert len(dup) == 1 and dup[0]["path"] == "ok/1.dcm"
    for e in q["entries"]:
        assert e["detail"] and e["fix"] and isinstance(e["row"], int)
    # counts reconcile: every manifest row is either used or quarantined, exactly once
    assert report.n_used == 4
    assert report.n_used + report.n_quarantined == report.n_rows == len(s.rows)
    assert q["used"] + q["quarantined"] == q["rows"] == len(s.rows)
    assert sorted(e["row"] for e in q["entries"]) == sorted({e["row"] for e in q["entries"]})
    assert sum(q["by_reason"].values()) == q["quarantined"]


def test_conflicting_duplicate_labels_quarantine_both_rows(site_builder):
    s = site_builder()
    s.add_dicom("x.dcm", "a")
    s.add("x.dcm", "b")
    s.add_dicom("y.dcm", "b")
    q_path = s.write()
    report = check_site(load_site_config(q_path))
    q = quarantine(q_path)
    assert report.n_used == 1
    assert [e["reason"] for e in q["entries"]] == ["duplicate_row", "duplicate_row"]


def test_the_same_dicom_object_exported_twice_with_other_bytes_is_one_scan(site_builder):
    """A re-encoded or re-anonymised copy keeps its SOPInstanceUID: counting it twice within one patient would give
    one scan two records (twice the contribution the accountant assumes). Under another patient it stays a separate
    record (one patient's rows never decide another's) and the check names it."""
    import pydicom

    s = site_builder()
    original = s.add_dicom("x.dcm", "a", patient_id="P1")
    s.add_dicom("y.dcm", "b", patient_id="P2")
    for rel, label, pid in (("copy_same_label.dcm", "a", "P1"), ("copy_other_label.dcm", "b", "P3"),
                            ("copy_other_label_again.dcm", "a", "P3")):
        ds = pydicom.dcmread(original)
        ds.InstitutionName = f"re-export {rel}"  # other bytes, same object
        ds.save_as(s.root / rel, enforce_file_format=True)
        s.add(rel, label, pid)
    cfg_path = s.write()
    report = check_site(load_site_config(cfg_path))
    q = quarantine(cfg_path)
    assert report.n_used == 2  # x.dcm and y.dcm: P3 lists the object under two labels, P1 twice
    by_path = {e["path"]: e for e in q["entries"]}
    assert set(by_path) == {"copy_same_label.dcm", "copy_other_label.dcm", "copy_other_label_again.dcm"}
    assert all(e["reason"] == "duplicate_row" for e in by_path.values())
    assert "SOPInstanceUID" in by_path["copy_same_label.dcm"]["detail"] and "row 2" in by_path[
        "copy_same_label.dcm"]["detail"]
    assert "different label" in by_path["copy_other_label_again.dcm"]["detail"]


def test_a_series_with_a_slice_exported_twice_is_inconsistent(site_builder):
    import pydicom

    from medfdd.prepare.writers import write_dicom_series

    s = site_builder(spatial_size=(4, 16, 16))
    folder = write_dicom_series(s.root / "series", s.rng.integers(0, 255, (4, 16, 16), dtype=np.uint8),
                                patient_id="P1", rng=s.rng)
    ds = pydicom.dcmread(folder / "slice_0003.dcm")
    ds.InstanceNumber = 9  # a second copy of slice 3, renumbered
    ds.save_as(folder / "slice_0009.dcm", enforce_file_format=True)
    s.add("series", "a", "P1")
    write_dicom_series(s.root / "ok", s.rng.integers(0, 255, (4, 16, 16), dtype=np.uint8), patient_id="P2", rng=s.rng)
    s.add("ok", "b", "P2")
    cfg_path = s.write()
    check_site(load_site_config(cfg_path))
    (entry,) = quarantine(cfg_path)["entries"]
    assert entry["reason"] == "inconsistent_series" and "SOPInstanceUID" in entry["detail"]


def test_unreadable_file_is_quarantined(site_builder):
    if os.geteuid() == 0:
        pytest.skip("root reads every file; permission errors cannot be produced")
    s = site_builder()
    p = s.add_dicom("x.dcm", "a")
    s.add_dicom("y.dcm", "b")
    p.chmod(0)
    report = check_site(load_site_config(s.write()))
    assert report.n_quarantined == 1


# case -> (manifest header, problem the ManifestError states)
MANIFEST_COLUMNS = {
    "manifest without a label column": (["path", "patient_id"], "missing column(s) ['label']"),
    "manifest without a path column": (["file", "label"], "missing column(s) ['path']"),
    "manifest with an extra column": (["path", "label", "age"], "unknown column(s) ['age']"),
}


@pytest.mark.parametrize("header, problem", list(MANIFEST_COLUMNS.values()), ids=list(MANIFEST_COLUMNS))
def test_manifest_columns_are_checked(site_builder, header, problem):
    s = site_builder()
    s.add_dicom("x.dcm", "a")
    cfg = s.write(header=header)
    with pytest.raises(ManifestError) as e:
        check_site(load_site_config(cfg))
    assert problem in str(e.value) and "labels.csv" in str(e.value) and "Fix:" in str(e.value)


def test_non_utf8_manifest(site_builder):
    s = site_builder(classes=["a", "b"])
    s.add_dicom("x.dcm", "a")
    cfg = s.write()
    (s.root / "labels.csv").write_bytes("path,label\nx.dcm,caf\xe9\n".encode("latin-1"))
    with pytest.raises(ManifestError) as e:
        check_site(load_site_config(cfg))
    assert "not UTF-8" in str(e.value) and "iconv" in str(e.value)


def test_missing_manifest(site_builder):
    s = site_builder()
    cfg = s.write()
    (s.root / "labels.csv").unlink()
    with pytest.raises(ManifestError, match="manifest not found"):
        check_site(load_site_config(cfg))


def test_nothing_usable_exits_nonzero_but_writes_the_report(site_builder, capsys):
    s = site_builder()
    (s.root / "bad.dcm").write_bytes(b"not dicom at all")
    s.add("bad.dcm", "a")
    cfg = s.write()
    with pytest.raises(NoUsableDataError):
        check_site(load_site_config(cfg))
    assert quarantine(cfg)["quarantined"] == 1
    assert main(["site", "check", str(cfg)]) == exit_codes.RUNTIME_ERROR
    err = capsys.readouterr().err
    assert "none of the 1 manifest rows is usable" in err and "Traceback" not in err


def test_cli_check_exit_zero_with_some_quarantined(site_builder):
    s = site_builder()
    s.add_dicom("x.dcm", "a")
    s.add("gone.dcm", "b")
    assert main(["site", "check", str(s.write())]) == 0


def test_mixed_2d_3d_site(site_builder):
    s = site_builder(spatial_size=[16, 16])
    s.add_dicom("flat.dcm", "a")
    s.add_dicom("multi.dcm", "b", pixels=np.random.default_rng(0).integers(0, 255, (5, 16, 16), dtype=np.uint8))
    report = check_site(load_site_config(s.write()))
    assert report.n_used == 1 and report.by_reason == {"wrong_dimensionality": 1}


def test_inconsistent_series_folder(site_builder):
    s = site_builder(spatial_size=[3, 8, 8])
    rng = np.random.default_rng(0)
    for z in range(3):
        write_dicom(s.root / "ser" / f"{z}.dcm", rng.integers(0, 255, (8, 8), dtype=np.uint8), patient_id="P",
                    rng=rng, instance_number=1)  # every slice claims InstanceNumber 1
    s.add("ser", "a")
    for z in range(3):
        write_dicom(s.root / "ok" / f"{z}.dcm", rng.integers(0, 255, (8, 8), dtype=np.uint8), patient_id="P",
                    rng=rng, instance_number=z + 1, series_uid="1.2.3", study_uid="1.2")
    s.add("ok", "b")
    report = check_site(load_site_config(s.write()))
    assert report.n_used == 1
    assert report.by_reason == {"inconsistent_series": 1}


def test_site_with_single_class_warns(site_builder):
    s = site_builder()
    s.add_dicom("x.dcm", "a")
    s.add_dicom("y.dcm", "a")
    report = check_site(load_site_config(s.write()))
    assert any("only one class" in w for w in report.warnings)
    assert any("no usable record for class(es) ['b']" in w for w in report.warnings)


def test_quarantine_entries_never_crash_on_weird_names(site_builder):
    s = site_builder()
    s.add_dicom("ok.dcm", "a")
    s.add_dicom("dir with spaces/naïve,name.dcm", "b")
    report = check_site(load_site_config(s.write()))
    assert report.n_used == 2


def test_config_errors_name_file_key_and_fix(site_builder, tmp_path):
    s = site_builder()
    s.add_dicom("x.dcm", "a")
    cfg = s.write()
    text = cfg.read_text()
    cfg.write_text(text.replace("holdout_fraction: 0.2", "holdout_fraction: 0.2\n  colour: red"))
    with pytest.raises(ConfigError) as e:
        load_site_config(cfg)
    assert "data.colour" in str(e.value) and "unknown key" in str(e.value) and str(cfg) in str(e.value)
    cfg.write_text(text.replace("epsilon: 1.0", "epsilon: -1"))
    with pytest.raises(ConfigError) as e:
        load_site_config(cfg)
    assert "privacy.epsilon" in str(e.value) and "-1" in str(e.value)
    cfg.write_text(text.replace("ipc: 2", "ipc: 0"))
    with pytest.raises(ConfigError, match="distill.ipc"):
        load_site_config(cfg)
    cfg.write_text(text.replace("delta: 1.0e-05", "delta: 1.5"))
    with pytest.raises(ConfigError, match="privacy.delta"):
        load_site_config(cfg)
    cfg.write_text(text.replace("mode: minmax", "mode: ct_window\n    center: 40"))
    with pytest.raises(ConfigError, match="data.intensity.width"):
        load_site_config(cfg)
    cfg.write_text(text.replace("- 16\n  - 16", "- 16\n  - 16\n  - 16\n  - 16"))
    with pytest.raises(ConfigError, match="data.spatial_size"):
        load_site_config(cfg)
    cfg.write_text("site_id: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_site_config(cfg)
    assert main(["site", "check", str(cfg)]) == exit_codes.RUNTIME_ERROR
    with pytest.raises(ConfigError, match="config file not found"):
        load_site_config(tmp_path / "nope.yaml")
