"""Write real scanner-format files (DICOM via pydicom, NIfTI via nibabel, PNG via Pillow).

Used by `medfdd prepare` to materialise consortia and by tests to make small inputs. Arrays are given in
row-major order, [H, W] or [D, H, W]; NIfTI stores them in its own (x, y, z) index order.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

UID_PREFIX = "1.2.826.0.1.3680043.10.1453."  # medfdd's generated-UID root (pydicom-style)


def _uid(rng: np.random.Generator) -> str:
    return generate_uid(prefix=UID_PREFIX, entropy_srcs=[str(rng.integers(0, 2**63))])


def _integer_pixels(array: np.ndarray) -> np.ndarray:
    a = np.asarray(array)
    if a.dtype in (np.uint8, np.uint16, np.int16):
        return a
    raise TypeError(f"DICOM pixels must be uint8, uint16 or int16, got {a.dtype}: scale the array first")


def dicom_dataset(
    pixels: np.ndarray,
    *,
    patient_id: str,
    rng: np.random.Generator,
    modality: str = "OT",
    study_uid: str | None = None,
    series_uid: str | None = None,
    instance_number: int = 1,
    slice_position: float = 0.0,
    rescale: tuple[float, float] | None = None,
    extra: dict[str, object] | None = None,
) -> Dataset:
    """A Secondary Capture DICOM dataset holding `pixels` ([H, W], [H, W, 3] RGB, or [F, H, W] multi-frame)."""
    px = _integer_pixels(pixels)
    rgb = px.ndim == 3 and px.shape[-1] == 3 and px.dtype == np.uint8 and px.shape[0] != 3
    frames = px.shape[0] if (px.ndim == 3 and not rgb) else 1
    rows, cols = (px.shape[0], px.shape[1]) if rgb else px.shape[-2:]

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = _uid(rng)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or _uid(rng)
    ds.SeriesInstanceUID = series_uid or _uid(rng)
    ds.PatientID = patient_id
    ds.PatientName = "Anonymous"
    ds.Modality = modality
    ds.ContentDate = _dt.date(2000, 1, 1).strftime("%Y%m%d")
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [0.0, 0.0, float(slice_position)]
    # columns toward the patient's right, rows toward anterior (DICOM's x, y point left, posterior): the geometry of
    # `write_nifti`'s default identity (RAS) affine, so both writers store one array as the same anatomy
    ds.ImageOrientationPatient = [-1.0, 0.0, 0.0, 0.0, -1.0, 0.0]
    ds.PixelSpacing = [1.0, 1.0]
    ds.Rows, ds.Columns = int(rows), int(cols)
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = "RGB" if rgb else "MONOCHROME2"
    if rgb:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    bits = px.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = 1 if px.dtype == np.int16 else 0
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    for k, v in (extra or {}).items():
        setattr(ds, k, v)
    ds.PixelData = np.ascontiguousarray(px).tobytes()
    return ds


def write_dicom(path: Path, pixels: np.ndarray, **kwargs) -> Path:
    """Write one DICOM file (single frame, RGB or multi-frame); see `dicom_dataset` for the keywords."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dicom_dataset(pixels, **kwargs).save_as(path, enforce_file_format=True)
    return path


def write_dicom_series(folder: Path, volume: np.ndarray, *, patient_id: str, rng: np.random.Generator, **kw) -> Path:
    """Write a [D, H, W] volume as one DICOM file per slice (InstanceNumber 1..D) in `folder`, like a PACS export."""
    folder = Path(folder)
    study, series = _uid(rng), _uid(rng)
    for z, plane in enumerate(volume):
        write_dicom(folder / f"slice_{z:04d}.dcm", plane, patient_id=patient_id, rng=rng, study_uid=study,
                    series_uid=series, instance_number=z + 1, slice_position=float(z), **kw)
    return folder


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None, rgb: bool = False) -> Path:
    """Write a NIfTI-1 image; `array` is row-major ([H, W] or [D, H, W]) and stored in NIfTI's (x, y, z) order.

    rgb=True takes [H, W, 3] and stores a vector image (x, y, 1, 1, 3) with intent 'vector', the NIfTI way.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.asarray(array)
    if rgb:
        xyz = np.ascontiguousarray(np.transpose(data, (1, 0, 2))[:, :, None, None, :])
    else:
        xyz = np.ascontiguousarray(np.transpose(data, tuple(range(data.ndim))[::-1]))
    img = nib.Nifti1Image(xyz, np.eye(4) if affine is None else affine)
    if rgb:
        img.header.set_intent("vector")
    nib.save(img, str(path))
    return path


def write_png(path: Path, array: np.ndarray) -> Path:
    """Write an 8- or 16-bit grayscale ([H, W]) or RGB ([H, W, 3]) PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array)).save(path)
    return path
