"""One anatomy, one array: NIfTI volumes with any affine and DICOM series with any patient geometry are reoriented to
`data.orientation` (MONAI Orientation) and optionally resampled to `data.spacing` (MONAI Spacing).

The files are real NIfTI-1 (nibabel) and DICOM (pydicom) files; the geometry is written by hand from the standards'
formulas (NIfTI-1 sform; DICOM PS3.3 C.7.6.2.1.1, converted LPS -> RAS), not taken from the code under test.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medfdd.config import DataConfig
from medfdd.data.cache import settings_fingerprint
from medfdd.data.load import load_scan
from medfdd.prepare.writers import write_dicom, write_nifti

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def cfg(root: Path, spatial, **kw) -> DataConfig:
    return DataConfig(root=root, classes=["a", "b"], spatial_size=list(spatial), **kw)


def volume(shape=(6, 7, 5), seed=0) -> np.ndarray:
    """An asymmetric (x, y, z) volume: any flip or transpose changes it."""
    v = np.random.default_rng(seed).integers(0, 1000, size=shape).astype(np.int16)
    v[0, 0, 0] = 4000
    return v


def save_nifti(path: Path, data_xyz: np.ndarray, affine: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data_xyz, affine), str(path))
    return path


def flipped(data: np.ndarray, affine: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The same anatomy stored with `axes` reversed: voxel i along an axis of n voxels becomes n - 1 - i, and the
    affine maps the new index to the same world point (its column negated, its origin moved to the far end)."""
    a = affine.copy()
    for ax in axes:
        n = data.shape[ax]
        a[:3, 3] += affine[:3, ax] * (n - 1)
        a[:3, ax] = -affine[:3, ax]
    return np.flip(data, axis=axes).copy(), a


def test_nifti_with_ras_lps_and_las_affines_loads_to_one_array(tmp_path):
    v = volume()
    ras = np.diag([0.9, 1.1, 2.0, 1.0])
    ras[:3, 3] = [-20.0, 15.0, 40.0]
    files, stored = {}, {}
    for name, axes in [("ras", ()), ("lps", (0, 1)), ("las", (0,))]:
        data, affine = flipped(v, ras, axes)
        assert "".join(nib.aff2axcodes(affine)) == name.upper()
        files[name] = save_nifti(tmp_path / f"{name}.nii.gz", data, affine)
        stored[name] = data
    # a permuted storage too (axes (z, x, y) on disk, e.g. a sagittal export)
    files["sra"] = save_nifti(tmp_path / "sra.nii.gz", np.transpose(v, (2, 0, 1)).copy(), ras[:, [2, 0, 1, 3]])
    assert not np.array_equal(stored["ras"], stored["lps"])  # the files really store other voxel orders

    c = cfg(tmp_path, (5, 7, 6))  # native size: no resize between the files and the comparison
    loaded = {name: load_scan(f, root=tmp_path, cfg=c)[0] for name, f in files.items()}
    for name, x in loaded.items():
        np.testing.assert_array_equal(x, loaded["ras"], err_msg=name)
    ref = v.transpose(2, 1, 0).astype(np.float32)  # RAS, row-major (z, y, x), min-max scaled
    np.testing.assert_allclose(loaded["ras"][0], (ref - ref.min()) / (ref.max() - ref.min()), atol=1e-6)

    # the key acts: asked for LPS, the RAS file comes back with x and y reversed
    lps, _ = load_scan(files["ras"], root=tmp_path, cfg=cfg(tmp_path, (5, 7, 6), orientation="lps"))
    np.testing.assert_array_equal(lps, loaded["ras"][:, :, ::-1, ::-1])


def _write_series(folder: Path, pixels: np.ndarray, *, iop, origin, pixel_spacing, slice_gap) -> None:
    """pixels [slices, rows, columns] as one DICOM file per slice, written in shuffled InstanceNumber order."""
    rng = np.random.default_rng(1)
    normal = np.cross(iop[:3], iop[3:])
    for k in rng.permutation(len(pixels)):
        ipp = np.asarray(origin) + k * slice_gap * normal
        write_dicom(folder / f"s{k:03d}.dcm", pixels[k], patient_id="P1", rng=rng, study_uid="1.2.3",
                    series_uid="1.2.3.4", instance_number=int(k) + 1,
                    extra={"ImageOrientationPatient": [float(x) for x in iop],
                           "ImagePositionPatient": [float(x) for x in ipp],
                           "PixelSpacing": [float(x) for x in pixel_spacing],
                           "SliceThickness": float(slice_gap)})


def _nifti_export(path: Path, pixels: np.ndarray, *, iop, origin, pixel_spacing, slice_gap) -> Path:
    """What a DICOM-to-NIfTI converter writes for that series: data (column, row, slice) and the DICOM affine
    (columns: column step, row step, slice step, in LPS mm) converted to RAS."""
    row_step, col_step = pixel_spacing  # PixelSpacing = [between rows, between columns]
    lps = np.eye(4)
    lps[:3, 0] = np.asarray(iop[:3]) * col_step  # along a row: the column index grows
    lps[:3, 1] = np.asarray(iop[3:]) * row_step
    lps[:3, 2] = np.cross(iop[:3], iop[3:]) * slice_gap
    lps[:3, 3] = origin
    return save_nifti(path, np.transpose(pixels, (2, 1, 0)).copy(), LPS_TO_RAS @ lps)


@pytest.mark.parametrize("iop", [[1, 0, 0, 0, 1, 0],      # axial, the usual export
                                 [0, 1, 0, 0, 0, -1],     # sagittal: rows run down (to inferior)
                                 [-1, 0, 0, 0, 0, -1]])   # coronal, columns to the patient's right
def test_dicom_series_and_its_nifti_export_load_identically(tmp_path, iop):
    pixels = volume((4, 6, 5), seed=2).astype(np.uint16)  # [slices, rows, columns]
    geometry = {"iop": np.asarray(iop, dtype=float), "origin": [-30.0, 12.5, 7.0], "pixel_spacing": [0.8, 0.7],
                "slice_gap": 2.5}
    _write_series(tmp_path / "series", pixels, **geometry)
    nii = _nifti_export(tmp_path / "export.nii.gz", pixels, **geometry)
    spatial = tuple(reversed(nib.as_closest_canonical(nib.load(str(nii))).shape))
    c = cfg(tmp_path, spatial)
    from_dicom, info = load_scan(tmp_path / "series", root=tmp_path, cfg=c)
    from_nifti, _ = load_scan(nii, root=tmp_path, cfg=c)
    assert info.format == "dicom" and from_dicom.shape == (1, *spatial)
    np.testing.assert_allclose(from_dicom, from_nifti, atol=1e-6)
    # and it is RAS: nibabel's own canonical reorientation of the export, row-major
    ref = np.asarray(nib.as_closest_canonical(nib.load(str(nii))).dataobj, dtype=np.float32).transpose(2, 1, 0)
    np.testing.assert_allclose(from_dicom[0], (ref - ref.min()) / (ref.max() - ref.min()), atol=1e-6)


def test_spacing_resamples_both_formats_alike(tmp_path):
    pixels = volume((4, 6, 5), seed=3).astype(np.uint16)
    geometry = {"iop": np.array([1.0, 0, 0, 0, 1, 0]), "origin": [0.0, 0.0, 0.0], "pixel_spacing": [1.0, 1.0],
                "slice_gap": 2.0}
    _write_series(tmp_path / "series", pixels, **geometry)
    nii = _nifti_export(tmp_path / "export.nii.gz", pixels, **geometry)
    c = cfg(tmp_path, (8, 6, 5), spacing=[1.0, 1.0, 1.0])
    from_dicom, info = load_scan(tmp_path / "series", root=tmp_path, cfg=c)
    from_nifti, info_nii = load_scan(nii, root=tmp_path, cfg=c)
    assert info.original_shape[1:] == info_nii.original_shape[1:] == (6, 5)  # in-plane 1 mm already
    assert info.original_shape[0] == info_nii.original_shape[0] >= 7  # 4 slices 2 mm apart -> about 1 mm apart
    np.testing.assert_allclose(from_dicom, from_nifti, atol=1e-5)
    _, plain = load_scan(nii, root=tmp_path, cfg=cfg(tmp_path, (8, 6, 5)))
    assert plain.original_shape == (4, 6, 5)


def test_single_file_dicom_keeps_its_stored_rows_and_columns(tmp_path):
    """Decision for 2D single-frame (and multi-frame) files: not reoriented. A radiograph's rows x columns are its
    display order; an affine from one slice's tags would flip some sites' 2D images and not others'."""
    img = volume((9, 7, 1), seed=4)[:, :, 0].astype(np.uint16)
    path = write_dicom(tmp_path / "one.dcm", img, patient_id="P1", rng=np.random.default_rng(0),
                       extra={"ImageOrientationPatient": [-1.0, 0, 0, 0, -1, 0]})  # opposite to LPS axial
    x, _ = load_scan(path, root=tmp_path, cfg=cfg(tmp_path, (9, 7)))
    ref = pydicom.dcmread(path).pixel_array.astype(np.float32)
    np.testing.assert_allclose(x[0], (ref - ref.min()) / (ref.max() - ref.min()), atol=1e-6)


def test_series_without_patient_geometry_keeps_instance_number_order(tmp_path):
    pixels = volume((3, 6, 5), seed=5).astype(np.uint16)
    rng = np.random.default_rng(0)
    for k in (2, 0, 1):
        ds_path = write_dicom(tmp_path / "s" / f"{k}.dcm", pixels[k], patient_id="P1", rng=rng, study_uid="1.2",
                              series_uid="1.2.3", instance_number=k + 1)
        ds = pydicom.dcmread(ds_path)
        del ds.ImageOrientationPatient, ds.ImagePositionPatient
        ds.save_as(ds_path, enforce_file_format=True)
    x, _ = load_scan(tmp_path / "s", root=tmp_path, cfg=cfg(tmp_path, (3, 6, 5)))
    ref = pixels.astype(np.float32)
    np.testing.assert_allclose(x[0], (ref - ref.min()) / (ref.max() - ref.min()), atol=1e-6)


def test_medfdd_writers_store_one_array_as_the_same_anatomy(tmp_path):
    """`medfdd prepare`'s DICOM series and NIfTI files of one [D, H, W] array load back to that array."""
    from medfdd.prepare.writers import write_dicom_series

    vol = volume((5, 6, 4), seed=6).astype(np.uint16)  # [D, H, W]
    c = cfg(tmp_path, vol.shape)
    a, _ = load_scan(write_dicom_series(tmp_path / "s", vol, patient_id="P", rng=np.random.default_rng(0)),
                     root=tmp_path, cfg=c)
    b, _ = load_scan(write_nifti(tmp_path / "v.nii.gz", vol), root=tmp_path, cfg=c)
    ref = vol.astype(np.float32)
    np.testing.assert_allclose(a[0], (ref - ref.min()) / (ref.max() - ref.min()), atol=1e-6)
    np.testing.assert_allclose(b, a, atol=1e-6)


def test_orientation_and_spacing_are_part_of_the_cache_key(tmp_path):
    base = cfg(tmp_path, (4, 6, 5))
    keys = {settings_fingerprint(base), settings_fingerprint(cfg(tmp_path, (4, 6, 5), orientation="LPS")),
            settings_fingerprint(cfg(tmp_path, (4, 6, 5), spacing=[1.0, 1.0, 1.0]))}
    assert len(keys) == 3
    assert settings_fingerprint(cfg(tmp_path, (4, 6, 5), orientation="ras")) == settings_fingerprint(base)


@pytest.mark.parametrize("bad", ["RAA", "RA", "XYZ", "RASL"])
def test_bad_axis_codes_are_refused_naming_the_key(tmp_path, bad):
    from medfdd.config import SiteConfig, parse_config
    from medfdd.errors import ConfigError

    raw = {"site_id": "s", "data": {"root": ".", "classes": ["a", "b"], "spatial_size": [4, 4, 4],
                                    "orientation": bad}, "output": "out"}
    with pytest.raises(ConfigError) as e:
        parse_config(raw, SiteConfig, "site.yaml", tmp_path)
    assert "orientation" in str(e.value)


def test_spacing_needs_a_3d_site(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="spacing"):
        cfg(tmp_path, (16, 16), spacing=[1.0, 1.0, 1.0])


def test_spacing_that_would_explode_the_volume_is_refused_before_resampling(tmp_path):
    from medfdd.data.quarantine import Reason, RecordRejected

    v = volume((6, 7, 5), seed=7)
    nii = save_nifti(tmp_path / "v.nii.gz", v, np.diag([1.0, 1.0, 2.0, 1.0]))
    with pytest.raises(RecordRejected) as e:
        load_scan(nii, root=tmp_path, cfg=cfg(tmp_path, (5, 7, 6), spacing=[0.001, 0.001, 0.001]))
    assert e.value.reason == Reason.TOO_LARGE and "data.spacing" in e.value.detail


def test_rgb_series_is_reoriented_with_its_colour_axis_kept(tmp_path):
    from medfdd.prepare.writers import write_dicom_series

    vol = np.random.default_rng(8).integers(0, 255, size=(3, 6, 5, 3), dtype=np.uint8)  # [D, H, W, RGB]
    folder = write_dicom_series(tmp_path / "s", vol, patient_id="P", rng=np.random.default_rng(0))
    x, _ = load_scan(folder, root=tmp_path, cfg=cfg(tmp_path, (3, 6, 5), channels=3))
    ref = np.moveaxis(vol, -1, 0).astype(np.float32)
    np.testing.assert_allclose(x, (ref - ref.min()) / (ref.max() - ref.min()), atol=1e-6)
