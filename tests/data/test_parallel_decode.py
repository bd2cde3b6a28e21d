"""Parallel decoding: the site's arrays, labels, patients, split and quarantine report do not depend on `workers`."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medfdd.config import load_site_config
from medfdd.data.decode import AUTO_ROWS_PER_WORKER, decode_workers
from medfdd.data.site_data import SiteData, load_site_data
from medfdd.errors import ConfigError
from medfdd.prepare.writers import write_nifti


def _mixed_site(s) -> Path:
    """DICOM and NIfTI scans, broken files of several kinds and duplicates of every sort, interleaved so that
    a worker's window holds good and bad rows, and copies of a scan both inside and across windows."""
    rng = np.random.default_rng(7)
    good = []
    for i in range(24):
        pid = f"P{i % 9}"
        if i % 3 == 2:
            write_nifti(s.root / f"n{i}.nii.gz", rng.integers(0, 4000, (20, 18), dtype=np.int16))
            s.add(f"n{i}.nii.gz", "ab"[i % 2], pid)
        else:
            good.append(s.add_dicom(f"d{i}.dcm", "ab"[i % 2], patient_id=pid,
                                    pixels=rng.integers(0, 255, (16 + i % 4, 16), dtype=np.uint8)))
        if i == 4:
            data = good[0].read_bytes()
            (s.root / "truncated.dcm").write_bytes(data[: len(data) - 100])
            s.add("truncated.dcm", "a", "P1")
            (s.root / "random.dcm").write_bytes(rng.bytes(2048))
            s.add("random.dcm", "b", "P2")
        if i == 9:
            (s.root / "empty.dcm").write_bytes(b"")
            s.add("empty.dcm", "a")
            nan = np.ones((16, 16), np.float32)
            nan[2, 3] = np.nan
            write_nifti(s.root / "nan.nii.gz", nan)
            s.add("nan.nii.gz", "a", "P3")
            write_nifti(s.root / "const.nii.gz", np.full((16, 16), 5, np.int16))
            s.add("const.nii.gz", "b", "P4")
            write_nifti(s.root / "vol.nii.gz", rng.random((3, 16, 16)).astype(np.float32))
            s.add("vol.nii.gz", "b", "P5")
            s.add("missing.dcm", "a", "P5")
            s.add("d0.dcm", "a", "P0")  # the same row again: duplicate of this patient
            s.add("d0.dcm", "a", "P7")  # the same scan under another patient: a separate record, shared content
            s.add_copy(s.root / "truncated.dcm", "truncated_again.dcm", "a", "P8")  # a failure decoded once
        if i == 20:
            ds = pydicom.dcmread(good[1])
            ds.InstitutionName = "re-export"  # other bytes, same DICOM object (SOPInstanceUID), same patient
            ds.save_as(s.root / "reexport.dcm", enforce_file_format=True)
            s.add("reexport.dcm", "b", "P1")
            s.add("d3.dcm", "a", "P3")  # the same scan listed later in its group with another label
            s.add("truncated.dcm", "b", "P6")  # far from the first copy: another window
    return s.write()


def _load(cfg_path: Path, workers: int, cache: bool, tag: str) -> SiteData:
    cfg = load_site_config(cfg_path)
    cfg = cfg.model_copy(update={"workers": workers, "output": cfg.output.parent / f"out-{tag}",
                                 "data": cfg.data.model_copy(update={"cache": cache})})
    seen: list[tuple[int, int]] = []
    data = load_site_data(cfg, on_record=lambda done, total: seen.append((done, total)))
    assert seen == [(k, seen[0][1]) for k in range(1, seen[0][1] + 1)]  # progress: every row, in order
    return data


def _assert_same(a: SiteData, b: SiteData) -> None:
    assert a.images.dtype == b.images.dtype and a.images.shape == b.images.shape
    assert a.images.tobytes() == b.images.tobytes()
    for field in ("labels", "rows", "train", "holdout", "unused"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    assert a.patient_ids == b.patient_ids and a.infos == b.infos and a.n_rows == b.n_rows
    assert [asdict(q) for q in a.quarantine] == [asdict(q) for q in b.quarantine]
    assert a.shared_content == b.shared_content


def test_one_and_two_workers_give_the_same_site(site_builder):
    cfg_path = _mixed_site(site_builder(classes=["a", "b"], spatial_size=[16, 16]))
    one = _load(cfg_path, 1, cache=False, tag="1")
    two = _load(cfg_path, 2, cache=False, tag="2")
    _assert_same(one, two)
    reasons = {q.path: str(q.reason) for q in one.quarantine}
    assert reasons == {
        "truncated.dcm": "corrupt_pixel_data", "random.dcm": "not_dicom", "empty.dcm": "empty_file",
        "nan.nii.gz": "non_finite", "const.nii.gz": "constant_image", "vol.nii.gz": "wrong_dimensionality",
        "missing.dcm": "missing_file", "d0.dcm": "duplicate_row", "truncated_again.dcm": "corrupt_pixel_data",
        "reexport.dcm": "duplicate_row", "d3.dcm": "duplicate_row"}
    assert sum(q.path == "truncated.dcm" for q in one.quarantine) == 2  # both rows of it, each with its reason
    assert sum(q.path == "d3.dcm" for q in one.quarantine) == 2  # both labels of the relabelled scan
    assert len(one.labels) + len(one.quarantine) == one.n_rows == 24 + 13
    assert any(len(g) == 2 for g in one.shared_content)  # d0.dcm under P0 and P7
    # two workers filling the cache, then a warm run reading it (in-process: each worker's start costs seconds)
    cold = _load(cfg_path, 2, cache=True, tag="cache")
    warm = _load(cfg_path, 1, cache=True, tag="cache")
    _assert_same(one, cold)
    _assert_same(one, warm)
    decode_failures = sum(str(q.reason) in ("corrupt_pixel_data", "not_dicom", "empty_file", "non_finite",
                                            "constant_image", "wrong_dimensionality") for q in one.quarantine)
    assert cold.cache_hits == 0 and warm.cache_misses == decode_failures  # failures are not cached: tried again


def test_workers_setting(site_builder):
    assert decode_workers(3, 10) == 3
    assert decode_workers("auto", AUTO_ROWS_PER_WORKER - 1) == 1  # a small site is decoded in-process
    assert decode_workers("auto", 10**9) == len(os.sched_getaffinity(0))
    s = site_builder()
    s.add_dicom("x.dcm", "a")
    with pytest.raises(ConfigError, match="workers"):
        load_site_config(s.write(workers=0))
