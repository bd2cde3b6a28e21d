"""Real scanner files (pydicom's test files, pydicom-data, nibabel's test data) through the MONAI loading path."""

from __future__ import annotations

from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from medfdd.config import DataConfig
from medfdd.data.load import load_scan
from medfdd.data.quarantine import Reason, RecordRejected

NIB_DATA = Path(nibabel.__file__).parent / "tests" / "data"


def dicom_file(name: str) -> Path:
    p = get_testdata_file(name, download=False)
    if p is None:
        pytest.fail(f"{name} not found: pydicom-data must be installed (it is a dev dependency)")
    return Path(p)


def cfg(spatial=(32, 32), **kw) -> DataConfig:
    return DataConfig(root=Path("."), classes=["a", "b"], spatial_size=list(spatial), **kw)


def load(path: Path, c: DataConfig):
    return load_scan(path, root=path.parent, cfg=c)


def assert_tensor(x: np.ndarray, shape: tuple[int, ...]):
    assert x.shape == shape
    assert x.dtype == np.float32
    assert np.isfinite(x).all()
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert x.max() - x.min() > 0.2  # real content survived preprocessing


@pytest.mark.parametrize("name, modality, syntax", [
    ("CT_small.dcm", "CT", "Explicit VR Little Endian"),
    ("MR_small.dcm", "MR", "Explicit VR Little Endian"),
    ("MR_small_implicit.dcm", "MR", "Implicit VR Little Endian"),
    ("MR_small_bigendian.dcm", "MR", "Explicit VR Big Endian"),
    ("MR_small_RLE.dcm", "MR", "RLE Lossless"),
    ("MR_small_jp2klossless.dcm", "MR", "JPEG 2000 Image Compression (Lossless Only)"),
    ("693_J2KR.dcm", "CT", "JPEG 2000 Image Compression (Lossless Only)"),
    ("RG1_UNCR.dcm", "CR", "Explicit VR Little Endian"),
    ("RG1_J2KR.dcm", "CR", "JPEG 2000 Image Compression (Lossless Only)"),
    ("US1_UNCR.dcm", "US", "Explicit VR Little Endian"),
    ("US1_J2KR.dcm", "US", "JPEG 2000 Image Compression (Lossless Only)"),
])
def test_real_dicom_2d(name, modality, syntax):
    path = dicom_file(name)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert ds.file_meta.TransferSyntaxUID.name == syntax  # the case really is what it claims
    x, info = load(path, cfg())
    assert_tensor(x, (1, 32, 32))
    assert info.format == "dicom" and info.modality == modality


def test_transfer_syntaxes_decode_to_the_same_image():
    """Same MR slice stored five ways -> identical tensors (decoding, byte order and VR handled)."""
    names = ["MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm",
             "MR_small_jp2klossless.dcm"]
    tensors = [load(dicom_file(n), cfg((64, 64)))[0] for n in names]
    for t in tensors[1:]:
        np.testing.assert_allclose(t, tensors[0], atol=1e-6)


def test_row_major_orientation_matches_pydicom():
    """No axis swap: the tensor at native size is pydicom's pixel_array, min-max scaled."""
    path = dicom_file("MR_small.dcm")
    ref = pydicom.dcmread(path).pixel_array.astype(np.float32)
    ref = (ref - ref.min()) / (ref.max() - ref.min())
    x, _ = load(path, cfg((64, 64)))
    np.testing.assert_allclose(x[0], ref, atol=1e-5)


def test_ct_window_uses_hounsfield_units():
    path = dicom_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    center, width = 40.0, 400.0
    ref = np.clip((hu - (center - width / 2)) / width, 0, 1)
    x, _ = load(path, cfg((128, 128), intensity={"mode": "ct_window", "center": center, "width": width}))
    np.testing.assert_allclose(x[0], ref, atol=1e-5)
    # the raw stored values would give a different picture: the rescale really was applied
    raw = np.clip((ds.pixel_array.astype(np.float32) - (center - width / 2)) / width, 0, 1)
    assert np.abs(raw - x[0]).mean() > 0.1


def test_percentile_clips_outliers():
    path = dicom_file("CT_small.dcm")
    x, _ = load(path, cfg((128, 128), intensity={"mode": "percentile", "lower": 5, "upper": 95}))
    assert_tensor(x, (1, 128, 128))
    assert (x == 0).mean() >= 0.04 and (x == 1).mean() >= 0.04  # ~5 % clipped at each end


def test_monochrome1_is_inverted():
    """CR stored as MONOCHROME1 (bright = low value) becomes MONOCHROME2-like: equal to the same image's inverse."""
    path = dicom_file("RG1_UNCR.dcm")
    assert pydicom.dcmread(path, stop_before_pixels=True).PhotometricInterpretation == "MONOCHROME1"
    raw = pydicom.dcmread(path).pixel_array.astype(np.float32)
    x, _ = load(path, cfg((raw.shape[0] // 5, raw.shape[1] // 5)))
    small = raw[::5, ::5][: x.shape[1], : x.shape[2]]
    corr = np.corrcoef(x[0].ravel(), small.ravel())[0, 1]
    assert corr < -0.9  # inverted relative to the stored values


def test_rgb_ultrasound_to_gray_and_rgb():
    path = dicom_file("US1_UNCR.dcm")
    gray, _ = load(path, cfg((48, 64), channels=1))
    rgb, _ = load(path, cfg((48, 64), channels=3))
    assert_tensor(gray, (1, 48, 64))
    assert rgb.shape == (3, 48, 64)
    assert not np.allclose(rgb[0], rgb[1])  # colour survived


def test_multiframe_dicom_is_a_volume():
    path = dicom_file("emri_small.dcm")
    frames = pydicom.dcmread(path).pixel_array  # (10, 64, 64)
    x, info = load(path, cfg((10, 64, 64)))
    assert_tensor(x, (1, 10, 64, 64))
    ref = frames.astype(np.float32)
    ref = (ref - ref.min()) / (ref.max() - ref.min())
    np.testing.assert_allclose(x[0], ref, atol=1e-5)  # frame order and in-plane orientation preserved
    with pytest.raises(RecordRejected) as e:
        load(path, cfg((32, 32)))
    assert e.value.reason == Reason.WRONG_DIMENSIONALITY


def test_dicom_series_folder_is_stacked_by_instance_number(tmp_path):
    """A folder of single-slice files (PACS series export) -> [1, D, H, W], ordered by InstanceNumber."""
    src = pydicom.dcmread(dicom_file("emri_small.dcm"))
    frames = src.pixel_array
    folder = tmp_path / "series"
    folder.mkdir()
    for z in [3, 0, 9, 5, 1, 8, 2, 7, 4, 6]:  # written out of order, with names that do not sort by z
        ds = pydicom.dcmread(dicom_file("MR_small.dcm"))
        ds.Rows, ds.Columns = frames.shape[1:]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = frames[z].astype(np.uint16).tobytes()
        ds.InstanceNumber = z + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(z)]
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(folder / f"img{(7 * z) % 10}{z}.dcm", enforce_file_format=True)
    x, _ = load(folder, cfg((10, 64, 64)))
    ref = frames.astype(np.float32)
    ref = (ref - ref.min()) / (ref.max() - ref.min())
    # MR_small's ImageOrientationPatient is axial [1, 0, 0, 0, 1, 0]: columns run to the patient's left and rows to
    # posterior; reoriented to RAS (data.orientation's default) both in-plane axes are reversed, slices (S) are not
    assert list(map(float, pydicom.dcmread(dicom_file("MR_small.dcm")).ImageOrientationPatient)) == [1, 0, 0, 0, 1, 0]
    np.testing.assert_allclose(x[0], ref[:, ::-1, ::-1], atol=1e-5)


@pytest.mark.parametrize("name, endian", [("anatomical.nii", ">"), ("standard.nii.gz", "<"),
                                          ("reoriented_anat_moved.nii", ">")])
def test_real_nifti_volumes(name, endian):
    path = NIB_DATA / name
    img = nibabel.load(path)
    assert img.header.endianness == endian
    x, info = load(path, cfg((8, 16, 16)))
    assert_tensor(x, (1, 8, 16, 16))
    assert info.format == "nifti"
    # reoriented to RAS, then row-major: the tensor's axes are (z, y, x) of nibabel's closest-canonical (RAS) array
    canonical = nibabel.as_closest_canonical(img)
    full, _ = load(path, cfg(tuple(reversed(canonical.shape))))
    data = np.asarray(canonical.dataobj, dtype=np.float32).transpose(2, 1, 0)
    np.testing.assert_allclose(full[0], (data - data.min()) / (data.max() - data.min()), atol=1e-5)


@pytest.mark.parametrize("name", ["functional.nii", "example4d.nii.gz"])
def test_4d_nifti_is_rejected_where_3d_expected(name):
    with pytest.raises(RecordRejected) as e:
        load(NIB_DATA / name, cfg((8, 16, 16)))
    assert e.value.reason == Reason.WRONG_DIMENSIONALITY
    assert "4D" in e.value.detail


def test_2d_nifti_and_png_written_by_medfdd(tmp_path):
    from medfdd.prepare.writers import write_nifti, write_png

    img = np.zeros((20, 30), dtype=np.uint8)
    img[2:8, 5:25] = 200  # an asymmetric bar: catches transposes and flips
    a, _ = load(write_nifti(tmp_path / "a.nii.gz", img), cfg((20, 30)))
    b, _ = load(write_png(tmp_path / "b.png", img), cfg((20, 30)))
    np.testing.assert_allclose(a[0], img / 200.0, atol=1e-6)
    np.testing.assert_allclose(b[0], img / 200.0, atol=1e-6)


@pytest.mark.parametrize("name, plugin", [("MR_small_jpeg_ls_lossless.dcm", "pylibjpeg-libjpeg"),
                                          ("JPGLosslessP14SV1_1s_1f_8b.dcm", "pylibjpeg-libjpeg")])
def test_undecodable_compression_names_the_plugin(name, plugin):
    with pytest.raises(RecordRejected) as e:
        load(dicom_file(name), cfg())
    assert e.value.reason == Reason.UNSUPPORTED_COMPRESSION
    assert plugin in e.value.fix


def test_dicom_without_pixels():
    with pytest.raises(RecordRejected) as e:
        load(dicom_file("rtplan.dcm"), cfg())
    assert e.value.reason == Reason.NO_PIXEL_DATA
