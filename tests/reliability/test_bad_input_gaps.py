"""Bad site input that tests/data/test_bad_inputs.py does not cover: more broken files, manifests and configs, and
whole sites that cannot join a round. Every case is a typed error naming the file or key with the fix, or a
quarantine entry with its reason; nothing crashes and the counts reconcile.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import yaml
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless
from reliability_helpers import tiny_consortium
from rich.console import Console

from medfdd.config import load_coordinator_config, load_site_config
from medfdd.errors import ConfigError, ManifestError, NoUsableDataError
from medfdd.federation.inprocess import run_inprocess
from medfdd.prepare.writers import write_dicom, write_nifti, write_png
from medfdd.site.check import check_site
from medfdd.site.distill import DistillError, distill_site
from privacy.accounting import PrivacyLedger

QUIET = Console(quiet=True)


def _pixels(rng, shape=(16, 16)) -> np.ndarray:
    return rng.integers(0, 255, size=shape, dtype=np.uint8)


def _edit_dicom(path: Path, **attrs) -> None:
    ds = pydicom.dcmread(path)
    meta = attrs.pop("file_meta", {})
    for k, v in meta.items():
        setattr(ds.file_meta, k, v)
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.save_as(path)


def rle_garbage(root: Path, rel: str, rng) -> None:
    p = write_dicom(root / rel, _pixels(rng), patient_id="P", rng=rng)
    ds = pydicom.dcmread(p)
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.PixelData = encapsulate([b"\x07garbage" * 5])
    ds["PixelData"].is_undefined_length = True
    ds.save_as(p, enforce_file_format=True)


def unknown_syntax(root: Path, rel: str, rng) -> None:
    _edit_dicom(write_dicom(root / rel, _pixels(rng), patient_id="P", rng=rng),
                file_meta={"TransferSyntaxUID": "1.2.3.4.5.6"})


def zero_rows(root: Path, rel: str, rng) -> None:
    _edit_dicom(write_dicom(root / rel, _pixels(rng), patient_id="P", rng=rng), Rows=0)


def truncated_png(root: Path, rel: str, rng) -> None:
    p = write_png(root / rel, _pixels(rng))
    p.write_bytes(p.read_bytes()[:60])


def nifti_bomb(root: Path, rel: str, rng) -> None:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((30000, 30000, 1000))
    hdr.set_data_dtype(np.uint8)
    (root / rel).write_bytes(hdr.binaryblock + b"\0" * 4 + b"\1" * 64)


def nifti_named_dcm(root: Path, rel: str, rng) -> None:
    tmp = write_nifti(root / "tmp.nii", rng.random((16, 16)).astype(np.float32))
    tmp.rename(root / rel)


def mixed_size_series(root: Path, rel: str, rng) -> None:
    for z, shape in enumerate([(16, 16), (16, 16), (12, 16)]):
        write_dicom(root / rel / f"{z}.dcm", _pixels(rng, shape), patient_id="P", rng=rng, instance_number=z + 1,
                    series_uid="1.2.3.4", study_uid="1.2.3")


def series_slice_without_rows(root: Path, rel: str, rng) -> None:
    for z in range(4):
        p = write_dicom(root / rel / f"{z}.dcm", _pixels(rng, (8, 8)), patient_id="P", rng=rng,
                        instance_number=z + 1, series_uid="1.2.3.5", study_uid="1.2.3")
    ds = pydicom.dcmread(p)
    del ds.Rows  # the last slice's header lost its Rows tag
    ds.save_as(p)


def bad_number_of_frames(root: Path, rel: str, rng) -> None:
    p = write_dicom(root / rel, _pixels(rng), patient_id="P", rng=rng)
    ds = pydicom.dcmread(p)
    ds.NumberOfFrames = 7
    ds.save_as(p)
    raw = p.read_bytes()
    at = raw.index(b"\x28\x00\x08\x00IS\x02\x007 ")  # (0028,0008) IS, length 2, "7 " -> "x " (no valid IS)
    p.write_bytes(raw[:at + 8] + b"x " + raw[at + 10:])


def multiframe_series_bomb(root: Path, rel: str, rng) -> None:
    """Every slice alone is within data.max_voxels (2**27), the series announces 3 x 3/4 of it: the guard must count
    frames, not only rows x columns x slices."""
    for z in range(3):
        p = write_dicom(root / rel / f"{z}.dcm", _pixels(rng, (8, 8)), patient_id="P", rng=rng,
                        instance_number=z + 1, series_uid="1.2.3.6", study_uid="1.2.3")
        ds = pydicom.dcmread(p)
        ds.NumberOfFrames = (3 * 2**27 // 4) // 64
        ds.save_as(p)


def series_slice_to_dev_zero(root: Path, rel: str, rng) -> None:
    write_dicom(root / rel / "0.dcm", _pixels(rng), patient_id="P", rng=rng, instance_number=1,
                series_uid="1.2.3.7", study_uid="1.2.3")
    os.symlink("/dev/zero", root / rel / "1.dcm")  # hashing it for the cache would never end


def copy_of(original: str):
    def make(root: Path, rel: str, rng) -> None:
        (root / rel).write_bytes((root / original).read_bytes())  # the same export twice, under another name
    return make


def pair_with_outside_companion(root: Path, rel: str, rng) -> None:
    """An Analyze-style NIfTI pair whose .img is a symlink out of the data root (the reader would follow it)."""
    elsewhere = root.parent / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    nib.save(nib.Nifti1Pair(rng.random((16, 16)).astype(np.float32), np.eye(4)), elsewhere / "pair.hdr")
    (root / rel).write_bytes((elsewhere / "pair.hdr").read_bytes())
    os.symlink(elsewhere / "pair.img", (root / rel).with_suffix(".img"))


def empty_folder(root: Path, rel: str, rng) -> None:
    (root / rel).mkdir(parents=True)


def dangling_link(root: Path, rel: str, rng) -> None:
    os.symlink(root / "deleted-since.dcm", root / rel)


def locked(root: Path, rel: str, rng) -> None:
    write_dicom(root / rel, _pixels(rng), patient_id="P", rng=rng)  # made unreadable by the test (EACCES)


def two_d_in_3d(root: Path, rel: str, rng) -> None:
    write_dicom(root / rel, _pixels(rng, (8, 8)), patient_id="P", rng=rng)


def four_d_in_3d(root: Path, rel: str, rng) -> None:
    write_nifti(root / rel, rng.random((3, 4, 8, 8)).astype(np.float32))  # NIfTI (x, y, z, t) = (8, 8, 4, 3)


def extra_field(root: Path, rel: str, rng) -> None:
    write_dicom(root / rel, _pixels(rng), patient_id="P", rng=rng)  # its manifest row gets a fourth field


# manifest path -> (kind of bad input, how it is made, expected quarantine reason)
QUARANTINED_2D = {
    "rle_garbage.dcm": ("compressed DICOM (RLE) whose pixel data does not decode", rle_garbage, "corrupt_pixel_data"),
    "unknown_syntax.dcm": ("DICOM with an unknown transfer syntax UID", unknown_syntax, "unsupported_compression"),
    "zero_rows.dcm": ("DICOM header with Rows = 0", zero_rows, "corrupt_pixel_data"),
    "truncated.png": ("PNG cut after its header", truncated_png, "corrupt_pixel_data"),
    "bomb.nii": ("NIfTI header announcing 30000 x 30000 x 1000 voxels (bomb guard, nothing allocated)", nifti_bomb,
                 "too_large"),
    "nifti_inside.dcm": ("NIfTI bytes with a .dcm suffix", nifti_named_dcm, "not_dicom"),
    "series_mixed": ("DICOM series folder whose slices differ in size", mixed_size_series, "inconsistent_series"),
    "empty_series": ("empty series folder", empty_folder, "missing_file"),
    "dangling.dcm": ("symlink to a deleted file inside the root", dangling_link, "missing_file"),
    "locked.dcm": ("file the site runner may not read (EACCES)", locked, "unreadable"),
    "bad_frames.dcm": ("DICOM whose NumberOfFrames is not a number", bad_number_of_frames, "corrupt_pixel_data"),
    "series_frames_bomb": ("DICOM series whose multi-frame slices add up past data.max_voxels",
                           multiframe_series_bomb, "too_large"),
    "series_dev_zero": ("DICOM series folder with a slice linked to /dev/zero", series_slice_to_dev_zero,
                        "outside_root"),
    "copy.dcm": ("byte-identical copy of another row's scan, same label", copy_of("ok/0.dcm"), "duplicate_row"),
    "relabelled_copy.dcm": ("byte-identical copy of another row's scan under another label (both rows quarantined)",
                            copy_of("ok/1.dcm"), "duplicate_row"),
    "pair.hdr": ("NIfTI pair whose .img companion links out of the data root", pair_with_outside_companion,
                 "outside_root"),
    "nul\0name.dcm": ("manifest path holding a NUL character", lambda root, rel, rng: None, "unreadable"),
    "extra_field.dcm": ("manifest row with more fields than columns (unquoted comma)", extra_field, "unreadable"),
}
COPIED_PATIENT = {"copy.dcm": "P0", "relabelled_copy.dcm": "P1"}  # the patients of ok/0.dcm and ok/1.dcm
QUARANTINED_3D = {
    "slice.dcm": ("2D image where the site expects 3D", two_d_in_3d, "wrong_dimensionality"),
    "4d.nii.gz": ("4D NIfTI where the site expects 3D", four_d_in_3d, "wrong_dimensionality"),
    "series_no_rows": ("DICOM series folder with a slice whose header has no Rows tag", series_slice_without_rows,
                       "corrupt_pixel_data"),
}


def _check_quarantine(s, cases: dict, cfg: Path, n_good: int) -> None:
    report = check_site(load_site_config(cfg), console=QUIET)
    q = json.loads((load_site_config(cfg).output_dir / "quarantine.json").read_text())
    got = {e["path"]: e for e in q["entries"]}
    assert {p: got[p]["reason"] for p in cases} == {p: reason for p, (_, _, reason) in cases.items()}
    assert all(e["detail"] and e["fix"] for e in q["entries"])
    assert report.n_used == n_good and report.n_used + report.n_quarantined == report.n_rows == len(s.rows)
    assert q["used"] + q["quarantined"] == q["rows"] == len(s.rows) and sum(q["by_reason"].values()) == q["quarantined"]


def test_more_broken_files_are_quarantined_with_their_reasons(site_builder, monkeypatch):
    s = site_builder(classes=["a", "b"], spatial_size=[16, 16])
    rng = np.random.default_rng(2)
    for i in range(4):
        s.add_dicom(f"ok/{i}.dcm", "ab"[i % 2], patient_id=f"P{i}")
    for rel, (_, make, _) in QUARANTINED_2D.items():
        make(s.root, rel, rng)
        s.add(rel, "a", COPIED_PATIENT.get(rel, ""))  # a copy is a duplicate within its patient's rows only
    s.rows[-1].append("surplus")  # extra_field.dcm's row
    assert list(QUARANTINED_2D)[-1] == "extra_field.dcm"
    real_open = builtins.open

    def open_(file, *a, **kw):  # fault injection: the OS refuses to read one file (root ignores chmod)
        if str(file).endswith("locked.dcm"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, *a, **kw)

    monkeypatch.setattr(builtins, "open", open_)
    _check_quarantine(s, {**QUARANTINED_2D, "ok/1.dcm": ("", None, "duplicate_row")}, s.write(), n_good=3)


def test_broken_volumes_in_a_3d_site_are_quarantined(site_builder):
    s = site_builder(classes=["a", "b"], spatial_size=[4, 8, 8])
    rng = np.random.default_rng(3)
    for i in range(2):
        write_nifti(s.root / f"ok{i}.nii.gz", rng.random((4, 8, 8)).astype(np.float32))
        s.add(f"ok{i}.nii.gz", "ab"[i])
    for rel, (_, make, _) in QUARANTINED_3D.items():
        make(s.root, rel, rng)
        s.add(rel, "b")
    _check_quarantine(s, QUARANTINED_3D, s.write(), n_good=2)


# ------------------------------------------------------------------------------------------ manifests

MANIFEST_CASES = {
    "zero-byte manifest": (b"", ManifestError, "manifest is empty"),
    "repeated column": (b"path,label,label\nx.dcm,a,a\n", ManifestError, "repeated column(s) ['label']"),
    "header only, no rows": (b"path,label\n", NoUsableDataError, "none of the 0 manifest rows"),
    "UTF-16 manifest": ("path,label\nx.dcm,a\n".encode("utf-16"), ManifestError, "not UTF-8"),
}


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_unusable_manifest_is_a_typed_error_naming_it(site_builder, case):
    content, error, problem = MANIFEST_CASES[case]
    s = site_builder()
    s.add_dicom("x.dcm", "a")
    cfg = s.write()
    (s.root / "labels.csv").write_bytes(content)
    with pytest.raises(error) as e:
        check_site(load_site_config(cfg), console=QUIET)
    assert problem in str(e.value) and "labels.csv" in str(e.value) and "Fix:" in str(e.value)


# ------------------------------------------------------------------------------------------ site configs


def _set(path: str, value):
    def edit(cfg: dict) -> dict:
        *parents, last = path.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[last] = value
        return cfg

    return edit


def _drop(key: str):
    return lambda cfg: {k: v for k, v in cfg.items() if k != key}


# case -> (edit of a valid config, or raw file bytes; the key the error names; text of the problem)
CONFIG_CASES = {
    "unknown top-level key": (_set("colour", "red"), "colour", "unknown key"),
    "misspelt nested key": (_set("privacy.epsilom", 1.0), "privacy.epsilom", "unknown key"),
    "epsilon = 0": (_set("privacy.epsilon", 0), "privacy.epsilon", "greater than 0"),
    "epsilon < 0": (_set("privacy.epsilon", -1), "privacy.epsilon", "greater than 0"),
    "epsilon NaN": (_set("privacy.epsilon", float("nan")), "privacy.epsilon", "greater than 0 (got nan)"),
    "epsilon as text": (_set("privacy.epsilon", "lots"), "privacy.epsilon", "valid number"),
    "delta = 0": (_set("privacy.delta", 0), "privacy.delta", "greater than 0"),
    "delta >= 1": (_set("privacy.delta", 1.5), "privacy.delta", "less than 1"),
    "dp not a boolean": (_set("privacy.dp", "maybe"), "privacy.dp", "valid boolean"),
    "unknown accountant": (_set("privacy.accountant", "magic"), "privacy.accountant", "'rdp' or 'prv'"),
    "rounds = 0": (_set("privacy.rounds", 0), "privacy.rounds", "greater than or equal to 1"),
    "IPC = 0": (_set("distill.ipc", 0), "distill.ipc", "greater than or equal to 1"),
    "iterations not an integer": (_set("distill.iterations", 1.5), "distill.iterations", "valid integer"),
    "unknown method": (_set("distill.method", "kip"), "distill.method", "'dm' or 'gm'"),
    "spatial_size as text": (_set("data.spatial_size", "16x16"), "data.spatial_size", "valid list"),
    "spatial_size of 4 axes": (_set("data.spatial_size", [4, 4, 4, 4]), "data.spatial_size", "at most 3"),
    "spatial_size 0": (_set("data.spatial_size", [0, 16]), "data.spatial_size", "[1, 4096]"),
    "one class only": (_set("data.classes", ["a"]), "data.classes", "at least 2"),
    "class listed twice": (_set("data.classes", ["a", "b", "a"]), "data.classes", "repeated: ['a']"),
    "holdout_fraction = 1": (_set("data.holdout_fraction", 1.0), "data.holdout_fraction", "less than 1"),
    "unknown format": (_set("data.format", "jpeg"), "data.format", "'auto', 'dicom', 'nifti' or 'png'"),
    "ct_window without width": (_set("data.intensity", {"mode": "ct_window", "center": 40}), "data.intensity.width",
                                "required key is missing"),
    "audit gate names an unknown attack": (_set("audit_gate", {"attacks": ["lira"]}), "audit_gate.attacks.0",
                                           "'loss', 'lira_online', 'lira_offline', 'dcr' or 'canary'"),
    "audit gate without the attack it runs": (_set("audit_gate", {"attacks": ["loss"]}), "audit_gate",
                                              "the gate on the offer path runs the dcr attack only"),
    "site_id with a path": (_set("site_id", "../../etc"), "site_id", "should match pattern"),
    "missing data section": (_drop("data"), "data", "required key is missing"),
    "top level is a list": (b"- site_id: x\n", None, "expected a mapping"),
    "invalid YAML": (b"site_id: [unclosed\n", None, "not valid YAML"),
    "config not UTF-8": (b"site_id: h\xf4pital\n", None, "not UTF-8"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config_is_a_typed_error_naming_file_and_key(site_builder, case):
    edit, key, problem = CONFIG_CASES[case]
    s = site_builder()
    s.add_dicom("x.dcm", "a")
    path = s.write()
    if isinstance(edit, bytes):
        path.write_bytes(edit)
    else:
        path.write_text(yaml.safe_dump(edit(yaml.safe_load(path.read_text()))))
    with pytest.raises(ConfigError) as e:
        load_site_config(path)
    msg = str(e.value)
    assert str(path) in msg and problem in msg and "Fix:" in msg, msg
    if key is not None:
        assert f"key '{key}'" in msg, msg


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_site_config(tmp_path / "nope.yaml")


# ------------------------------------------------------------------------------------------ whole sites

SITE_CASES = {
    "delta not below 1/n": ("privacy.delta = 0.5 at a site with 8 training records",
                            "check warns; distill raises DistillError naming privacy.delta before any charge"),
    "spatial size disagrees with the consortium": ("one site resizes to 12x12, the consortium agreed 16x16",
                                                   "offer rejected wrong_shape; the round completes without it"),
    "classes in another order": ("one site lists the consortium's classes reversed",
                                 "offer rejected inconsistent_metadata; the round completes without it"),
}


def test_delta_not_below_one_over_n_is_refused_before_any_charge(site_builder):
    s = site_builder()
    for i in range(10):
        s.add_dicom(f"{i}.dcm", "ab"[i % 2], patient_id=f"P{i}")
    cfg = s.write(privacy={"dp": True, "epsilon": 1.0, "delta": 0.5})
    report = check_site(load_site_config(cfg), console=QUIET)
    assert any("privacy.delta = 0.5 is not below 1/n" in w for w in report.warnings)
    with pytest.raises(DistillError) as e:
        distill_site(load_site_config(cfg), console=QUIET)
    assert "privacy.delta" in e.value.where and "1/n" in e.value.problem and "1e-5" in e.value.fix
    ledger = load_site_config(cfg).output_dir / "privacy_ledger.json"
    assert not ledger.exists() or PrivacyLedger.load(ledger).entries == ()


def test_sites_that_disagree_with_the_consortium_are_rejected_and_the_round_goes_on(tmp_path):
    coord = tiny_consortium(tmp_path / "c", sites=3)
    paths = load_coordinator_config(coord).site_paths
    ids = [load_site_config(p).site_id for p in paths]
    for p, edit in ((paths[1], _set("data.spatial_size", [12, 12])),
                    (paths[2], lambda c: _set("data.classes", c["data"]["classes"][::-1])(c))):
        p.write_text(yaml.safe_dump(edit(yaml.safe_load(p.read_text()))))
    run_inprocess(load_coordinator_config(coord), console=QUIET)
    run = json.loads((load_coordinator_config(coord).output_dir / "run.json").read_text())
    (r,) = run["rounds"]
    assert r["accepted"] == [ids[0]] and run["status"] == "completed"
    assert {x["site_id"]: x["reason"] for x in r["rejected"]} == {ids[1]: "wrong_shape",
                                                                  ids[2]: "inconsistent_metadata"}
