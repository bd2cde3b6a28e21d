"""One scan -> one preprocessed float32 tensor [C, *spatial_size], through MONAI's readers and dict transforms.

Every failure becomes a `RecordRejected` with a reason code and a fix, so the caller can quarantine the row.
Checks that can be made from the header (pixel data present, decodable transfer syntax, announced size) run
before any pixel is decoded (decompression-bomb guard). Arrays are returned row-major: [C, H, W] / [C, D, H, W].
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import torch
from PIL import Image
from pydicom.errors import InvalidDicomError

from medfdd.config import CTWindow, DataConfig, MinMax, Percentile
from medfdd.data.quarantine import Reason, RecordRejected

NIFTI_SUFFIXES = (".nii", ".nii.gz", ".hdr", ".img")
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
PNG_SUFFIXES = (".png",)
PIXEL_TAGS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))  # MONAI's axis labels for an affine to RAS (NIfTI's space)
LUMINANCE = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601
# MONAI warns once per reader that the optional GPU JPEG decoder (nvImageCodec) is absent; we decode with pydicom.
logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)


@dataclass(frozen=True)
class ScanInfo:
    """What `site check` reports about a loaded scan (no header values that could identify anyone)."""

    format: str
    modality: str
    original_shape: tuple[int, ...]
    # digests of the DICOM SOPInstanceUID of each object (file, or slice of a series): the same acquisition
    # exported twice with other bytes is still one scan. Digests, not UIDs; they stay at the site (cache only).
    instances: tuple[str, ...] = ()


def instance_digest(ds: pydicom.Dataset) -> str | None:
    uid = str(ds.get("SOPInstanceUID", "") or "").strip()
    return hashlib.blake2b(uid.encode(), digest_size=16, person=b"medfdd-sop").hexdigest() if uid else None


def detect_format(path: Path) -> str:
    """dicom | nifti | png, from the suffix, else from the DICOM magic bytes; a folder is a DICOM series."""
    if path.is_dir():
        return "dicom"
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(PNG_SUFFIXES):
        return "png"
    if name.endswith(DICOM_SUFFIXES):
        return "dicom"
    with open(path, "rb") as f:
        head = f.read(132)
    if head[128:132] == b"DICM":
        return "dicom"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    raise RecordRejected(Reason.UNREADABLE, f"cannot tell the format of {path.name!r} (suffix or content)",
                         "use .dcm, .nii/.nii.gz or .png, or set data.format")


# ---------------------------------------------------------------- DICOM


def _dicom_header(path: Path) -> pydicom.Dataset:
    if path.stat().st_size == 0:
        raise RecordRejected(Reason.EMPTY_FILE, "zero-byte file", "re-export the file from PACS")
    try:
        ds = pydicom.dcmread(path, defer_size=1024)
    except InvalidDicomError as e:
        raise RecordRejected(Reason.NOT_DICOM, f"not a DICOM file ({e})".replace("\n", " "),
                             "export the image as DICOM Part 10 (with the DICM preamble)") from None
    except Exception as e:  # truncated header, bad VR, ...
        raise RecordRejected(Reason.UNREADABLE, f"DICOM header unreadable: {type(e).__name__}: {e}",
                             "re-export the file; it may be truncated") from None
    if not any(t in ds for t in PIXEL_TAGS):
        sop = getattr(ds.get("SOPClassUID"), "name", "unknown SOP class")
        raise RecordRejected(Reason.NO_PIXEL_DATA, f"no pixel data element ({sop}; the file ends at byte "
                             f"{path.stat().st_size}, so it may also be a truncated export)",
                             "list only image objects (not SR, RT plans or presentation states); re-export it")
    return ds


def _header_int(ds: pydicom.Dataset, keyword: str, default: int) -> int:
    try:
        return int(ds.get(keyword, default) or default)
    except (TypeError, ValueError, OverflowError) as e:
        raise RecordRejected(Reason.CORRUPT_PIXEL_DATA, f"{keyword} is not a whole number ({type(e).__name__})",
                             "re-export the file; its header is damaged") from None


def header_values(ds: pydicom.Dataset) -> int:
    """Values the pixel data of one DICOM object decodes to: Rows x Columns x NumberOfFrames x SamplesPerPixel."""
    return (_header_int(ds, "Rows", 0) * _header_int(ds, "Columns", 0) * _header_int(ds, "NumberOfFrames", 1)
            * _header_int(ds, "SamplesPerPixel", 1))


def _check_dicom_header(ds: pydicom.Dataset, max_voxels: int) -> None:
    rows, cols = _header_int(ds, "Rows", 0), _header_int(ds, "Columns", 0)
    frames = _header_int(ds, "NumberOfFrames", 1)
    spp = _header_int(ds, "SamplesPerPixel", 1)
    if rows < 1 or cols < 1:
        raise RecordRejected(Reason.CORRUPT_PIXEL_DATA, f"Rows={rows}, Columns={cols}", "re-export the file")
    voxels = header_values(ds)
    if voxels > max_voxels:
        raise RecordRejected(Reason.TOO_LARGE, f"header announces {rows}x{cols}x{frames} frames x{spp} samples "
                             f"= {voxels} values (limit data.max_voxels = {max_voxels})",
                             "raise data.max_voxels if the scan is genuine")
    tsyntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if tsyntax is None:
        return
    try:
        compressed = tsyntax.is_compressed
    except ValueError:
        raise RecordRejected(Reason.UNSUPPORTED_COMPRESSION, f"unknown transfer syntax {tsyntax}",
                             "re-export with a standard transfer syntax") from None
    if compressed:
        from pydicom.pixels import get_decoder

        try:
            decoder = get_decoder(tsyntax)
        except NotImplementedError:
            raise RecordRejected(Reason.UNSUPPORTED_COMPRESSION, f"no decoder exists for {tsyntax.name}",
                                 "re-export uncompressed (Explicit VR Little Endian)") from None
        if not decoder.is_available:
            plugins = "; ".join(decoder.missing_dependencies)
            raise RecordRejected(Reason.UNSUPPORTED_COMPRESSION, f"{tsyntax.name} cannot be decoded here",
                                 f"install a decoder plugin ({plugins}), e.g. `pip install pylibjpeg-libjpeg`, "
                                 "or re-export uncompressed")


def _series_files(folder: Path, root: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    if not files:
        raise RecordRejected(Reason.MISSING_FILE, "the series folder is empty", "export the series' slices into it")
    for f in files:
        if not f.resolve().is_relative_to(root):
            raise RecordRejected(Reason.OUTSIDE_ROOT, f"{f.name} resolves outside the data root",
                                 "copy the slices into the folder")
        if f.is_dir():
            raise RecordRejected(Reason.INCONSISTENT_SERIES, f"sub-folder {f.name!r} inside a series folder",
                                 "put one series per folder, slices only")
    return files


def _check_series(folder: Path, root: Path, max_voxels: int) -> tuple[pydicom.Dataset, list[pydicom.Dataset]]:
    files = _series_files(folder, root)
    headers = []
    for f in files:
        try:
            ds = _dicom_header(f)
            _check_dicom_header(ds, max_voxels)  # every slice has Rows and Columns before they are compared
        except RecordRejected as e:
            raise RecordRejected(e.reason, f"slice {f.name}: {e.detail}", e.fix) from None
        headers.append(ds)
    numbers = [h.get("InstanceNumber") for h in headers]
    if any(n is None for n in numbers):
        raise RecordRejected(Reason.INCONSISTENT_SERIES, "slice(s) without InstanceNumber: "
                             + ", ".join(f.name for f, n in zip(files, numbers, strict=True) if n is None),
                             "re-export the series with InstanceNumber on every slice")
    if len(set(map(int, numbers))) != len(numbers):
        raise RecordRejected(Reason.INCONSISTENT_SERIES, "repeated InstanceNumber in the series",
                             "one series per folder; remove duplicated slices")
    uids = [d for d in map(instance_digest, headers) if d]
    if len(set(uids)) != len(uids):
        raise RecordRejected(Reason.INCONSISTENT_SERIES, "the same SOPInstanceUID on two slices (a slice exported "
                             "twice)", "one series per folder; remove duplicated slices")
    shapes = {(int(h.Rows), int(h.Columns)) for h in headers}
    if len(shapes) > 1:
        raise RecordRejected(Reason.INCONSISTENT_SERIES, f"slices of different sizes {sorted(shapes)}",
                             "one series per folder")
    if len({str(h.get("SeriesInstanceUID", "")) for h in headers}) > 1:
        raise RecordRejected(Reason.INCONSISTENT_SERIES, "slices from more than one SeriesInstanceUID",
                             "put one series per folder")
    first = headers[0]
    rows, cols = shapes.pop()
    total = sum(header_values(h) for h in headers)  # frames and samples count too, not only rows x columns
    if total > max_voxels:
        raise RecordRejected(Reason.TOO_LARGE, f"series of {len(headers)} slices of {rows}x{cols} announces {total} "
                             f"values, more than data.max_voxels = {max_voxels}",
                             "raise data.max_voxels if the scan is genuine")
    return first, headers


def _read_with_monai(path: Path, reader) -> tuple[np.ndarray, np.ndarray | None]:
    """-> (array in the reader's index order, its voxel-to-RAS affine or None)."""
    from monai.transforms import LoadImage

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        img = LoadImage(reader=reader, image_only=True)(str(path))
    affine = getattr(img, "affine", None)
    affine = None if affine is None else np.asarray(affine.detach().cpu().numpy() if isinstance(affine, torch.Tensor)
                                                    else affine, dtype=np.float64)
    return np.asarray(img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else img), affine


def _canonical(arr: np.ndarray, affine: np.ndarray, rgb: bool, cfg: DataConfig) -> np.ndarray:
    """Reorient a volume in reader index order, [i, j, k] (+ a trailing RGB axis), with its voxel-to-RAS affine, to
    `data.orientation` with MONAI `Orientation` (then `Spacing` to `data.spacing` if set); return it row-major,
    [k', j', i'] (+ RGB), the axis order NIfTI volumes always had here. The same anatomy stored with any affine, as
    NIfTI or as a DICOM series, so becomes one array (NIfTI-1 sform/qform; DICOM PS3.3 C.7.6.2.1.1)."""
    from monai.data import MetaTensor
    from monai.transforms import Orientation, Spacing

    flat = arr.ndim == (3 if rgb else 2)  # a 2D image with a 3D affine: orient it as one slice
    data = arr[:, :, None] if flat else arr
    data = np.moveaxis(data, -1, 0) if rgb else data[None]
    try:
        img = MetaTensor(torch.as_tensor(np.ascontiguousarray(data)), affine=torch.as_tensor(affine))
        img = Orientation(axcodes=cfg.orientation, labels=RAS_LABELS)(img)
    except Exception as e:  # a singular or non-finite affine
        raise RecordRejected(Reason.UNREADABLE, f"its affine cannot be reoriented to {cfg.orientation}: "
                             f"{type(e).__name__}: {e}"[:500], "re-export it with a valid NIfTI sform/qform or "
                             "DICOM ImageOrientationPatient / ImagePositionPatient") from None
    if cfg.spacing is not None and not flat:
        zooms = np.linalg.norm(np.asarray(img.affine, dtype=np.float64)[:3, :3], axis=0)
        voxels = math.prod(math.ceil(n * z / s) for n, z, s in zip(img.shape[1:], zooms, cfg.spacing, strict=True))
        if voxels * img.shape[0] > cfg.max_voxels:
            raise RecordRejected(Reason.TOO_LARGE, f"resampled to data.spacing = {cfg.spacing} mm it would hold "
                                 f"about {voxels} voxels (limit data.max_voxels = {cfg.max_voxels})",
                                 "choose a coarser data.spacing, or raise data.max_voxels")
        img = Spacing(pixdim=tuple(cfg.spacing), mode="bilinear")(img)
    out = np.asarray(img.detach().cpu().numpy())
    out = np.transpose(out, (0, 3, 2, 1))
    if flat:  # back to 2D: drop the axis the slice had no extent along, wherever the orientation moved it
        out = out.squeeze(axis=1 + [i for i, s in enumerate(out.shape[1:]) if s == 1][0])
    return np.moveaxis(out, 0, -1) if rgb else out[0]


def _declared_affine(header) -> bool:
    """NIfTI-1: the affine is meaningful when the sform or the qform is set (code > 0); otherwise nibabel's fallback
    (Analyze-style, from the voxel sizes alone) says nothing about the patient, and the stored order is kept."""
    return int(header.get("sform_code", 0) or 0) > 0 or int(header.get("qform_code", 0) or 0) > 0


def _series_geometry(headers: list[pydicom.Dataset]) -> bool:
    """A DICOM series can be oriented when every slice has ImageOrientationPatient and ImagePositionPatient and the
    positions do not all coincide (else there is no slice direction, and the InstanceNumber order is kept)."""
    if len(headers) < 2 or any("ImageOrientationPatient" not in h or "ImagePositionPatient" not in h
                               for h in headers):
        return False
    try:
        positions = np.array([[float(v) for v in h.ImagePositionPatient] for h in headers])
        cosines = np.array([float(v) for v in headers[0].ImageOrientationPatient])
    except (TypeError, ValueError):
        return False
    return (positions.shape[1] == 3 and cosines.shape == (6,) and bool(np.isfinite(positions).all())
            and bool(np.isfinite(cosines).all()) and float(np.ptp(positions, axis=0).max()) > 0)


def _load_dicom(path: Path, root: Path, cfg: DataConfig) -> tuple[np.ndarray, bool, ScanInfo]:
    """-> (array [*spatial] or [*spatial, 3], is_rgb, info), spatial row-major."""
    from monai.data import PydicomReader

    if path.is_dir():
        header, headers = _check_series(path, root, cfg.max_voxels)
    else:
        header = _dicom_header(path)
        _check_dicom_header(header, cfg.max_voxels)
        headers = [header]
    instances = tuple(sorted({d for d in map(instance_digest, headers) if d}))
    reader = PydicomReader(swap_ij=False, prune_metadata=True)  # (rows, columns[, samples], slices), affine in RAS
    try:
        arr, affine = _read_with_monai(path, reader)
    except Exception as e:
        raise RecordRejected(Reason.CORRUPT_PIXEL_DATA, f"pixel data could not be decoded: {type(e).__name__}: {e}"
                             .replace("\n", " ")[:500], "re-export the file; it may be truncated") from None
    spp = int(header.get("SamplesPerPixel", 1) or 1)
    rgb = spp == 3
    if path.is_dir() and affine is not None and _series_geometry(headers):
        if rgb:  # (rows, columns, 3, slices) -> (rows, columns, slices, 3)
            arr = np.moveaxis(arr, -2, -1)
        arr = _canonical(arr, affine, rgb, cfg)
    elif path.is_dir():  # no patient geometry: slices in InstanceNumber order (MONAI stacks them on the last axis)
        arr = np.moveaxis(arr, -1, 0) if not rgb else np.moveaxis(arr, -2, 0)
    # a single file (2D image or multi-frame) keeps its stored rows x columns order (see docs/site-operator.md)
    if str(header.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        arr = arr.max() + arr.min() - arr  # MONOCHROME1: low values are bright; flip to MONOCHROME2 convention
    info = ScanInfo("dicom", str(header.get("Modality", "?")), tuple(int(s) for s in arr.shape), instances)
    return arr, rgb, info


# ---------------------------------------------------------------- NIfTI / PNG


def _load_nifti(path: Path, root: Path, cfg: DataConfig) -> tuple[np.ndarray, bool, ScanInfo]:
    from monai.data import NibabelReader

    if path.stat().st_size == 0:
        raise RecordRejected(Reason.EMPTY_FILE, "zero-byte file", "re-export the volume")
    if path.suffix in (".hdr", ".img"):  # an Analyze-style pair: the reader opens the companion too
        companion = path.with_suffix(".img" if path.suffix == ".hdr" else ".hdr")
        if companion.exists() and not companion.resolve().is_relative_to(Path(root).resolve()):
            raise RecordRejected(Reason.OUTSIDE_ROOT, f"its companion {companion.name} resolves outside the data root",
                                 "copy both files of the pair into the data root")
    try:
        header = nib.load(str(path)).header
        header_shape = tuple(int(s) for s in header.get_data_shape())
        rgb = header.get_intent()[0] == "vector" and len(header_shape) == 5 and header_shape[3:] == (1, 3)
        declared = _declared_affine(header)
    except Exception as e:
        raise RecordRejected(Reason.UNREADABLE, f"not a readable NIfTI file: {type(e).__name__}: {e}"[:500],
                             "re-export the volume as NIfTI-1 (.nii or .nii.gz)") from None
    if math.prod(header_shape) > cfg.max_voxels:
        raise RecordRejected(Reason.TOO_LARGE, f"header announces shape {header_shape} (limit data.max_voxels = "
                             f"{cfg.max_voxels})", "raise data.max_voxels if the scan is genuine")
    try:
        arr, affine = _read_with_monai(path, NibabelReader())
    except Exception as e:
        raise RecordRejected(Reason.CORRUPT_PIXEL_DATA, f"voxel data could not be read: {type(e).__name__}: {e}"[:500],
                             "re-export the volume; it may be truncated") from None
    if rgb:  # vector image (x, y, z, 1, 3) -> (x, y, z, 3)
        arr = arr.reshape(arr.shape[:3] + (3,))
    elif arr.ndim > 3 and all(s == 1 for s in arr.shape[3:]):  # (x, y, z, 1): one volume
        arr = arr.reshape(arr.shape[:3])
    spatial = arr.ndim - rgb
    if declared and affine is not None and spatial in (2, 3):
        arr = _canonical(arr, affine, rgb, cfg)
    else:  # (x, y, z, t...) -> (z, y, x, t...): row-major spatial axes, extra axes kept at the end
        k = min(spatial, 3)
        arr = np.transpose(arr, list(range(k))[::-1] + list(range(k, arr.ndim)))
    return arr, rgb, ScanInfo("nifti", "nifti", tuple(int(x) for x in arr.shape))


def _load_png(path: Path, cfg: DataConfig) -> tuple[np.ndarray, bool, ScanInfo]:
    from monai.data import PILReader

    if path.stat().st_size == 0:
        raise RecordRejected(Reason.EMPTY_FILE, "zero-byte file", "re-export the image")
    try:
        with Image.open(path) as im:
            w, h = im.size
            bands = len(im.getbands())
    except Exception as e:
        raise RecordRejected(Reason.UNREADABLE, f"not a readable PNG: {type(e).__name__}: {e}"[:500],
                             "re-export the image") from None
    if w * h * bands > cfg.max_voxels:
        raise RecordRejected(Reason.TOO_LARGE, f"{w}x{h}x{bands} exceeds data.max_voxels = {cfg.max_voxels}",
                             "raise data.max_voxels if the image is genuine")
    try:
        arr, _ = _read_with_monai(path, PILReader(reverse_indexing=False))
    except Exception as e:
        raise RecordRejected(Reason.CORRUPT_PIXEL_DATA, f"pixels could not be decoded: {type(e).__name__}: {e}"[:500],
                             "re-export the image") from None
    rgb = arr.ndim == 3 and arr.shape[-1] in (3, 4)
    if rgb:
        arr = arr[..., :3]
    return arr, rgb, ScanInfo("png", "png", tuple(int(s) for s in arr.shape))


# ---------------------------------------------------------------- preprocessing


def _to_channel_first(arr: np.ndarray, rgb: bool, rank: int, channels: int) -> np.ndarray:
    """[*spatial(, 3)] -> [channels, *spatial] with exactly `rank` spatial axes (singleton axes squeezed)."""
    data = arr.astype(np.float32, copy=False)
    spatial = data.shape[:-1] if rgb else data.shape
    extra = len(spatial) - rank
    singles = [i for i, s in enumerate(spatial) if s == 1]
    if extra > 0 and len(singles) >= extra:  # a one-frame multi-frame image, a 2D NIfTI stored as (x, y, 1), ...
        data = data.squeeze(axis=tuple(singles[-extra:]))
        spatial = data.shape[:-1] if rgb else data.shape
    if len(spatial) != rank:
        raise RecordRejected(Reason.WRONG_DIMENSIONALITY,
                             f"{len(spatial)}D image of shape {tuple(spatial)}, the site expects {rank}D "
                             f"(data.spatial_size has {rank} entries)",
                             f"list only {rank}D scans, or change data.spatial_size consortium-wide")
    if rgb:
        data = np.moveaxis(data, -1, 0)
        if channels == 1:
            data = np.tensordot(LUMINANCE, data, axes=1)[None]
    else:
        data = data[None]
        if channels == 3:
            data = np.repeat(data, 3, axis=0)
    return np.ascontiguousarray(data, dtype=np.float32)


def intensity_transform(intensity: MinMax | Percentile | CTWindow):
    """The MONAI dict transform for the configured intensity mode, mapping to [0, 1]."""
    from monai.transforms import ScaleIntensityd, ScaleIntensityRanged, ScaleIntensityRangePercentilesd

    if isinstance(intensity, CTWindow):
        lo, hi = intensity.center - intensity.width / 2, intensity.center + intensity.width / 2
        return ScaleIntensityRanged("image", a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)
    if isinstance(intensity, Percentile):
        return ScaleIntensityRangePercentilesd("image", lower=intensity.lower, upper=intensity.upper,
                                               b_min=0.0, b_max=1.0, clip=True)
    return ScaleIntensityd("image", minv=0.0, maxv=1.0)


def preprocess_transform(cfg: DataConfig):
    """MONAI Compose of dict transforms: intensity -> resize (anti-aliased) or centre crop / zero pad
    (`data.fit`) -> float32."""
    from monai.transforms import Compose, EnsureTyped, Resized, ResizeWithPadOrCropd

    mode = "bilinear" if len(cfg.spatial_size) == 2 else "trilinear"
    fit = (ResizeWithPadOrCropd("image", spatial_size=tuple(cfg.spatial_size)) if cfg.fit == "crop_or_pad"
           else Resized("image", spatial_size=tuple(cfg.spatial_size), mode=mode, anti_aliasing=True))
    return Compose([
        intensity_transform(cfg.intensity),
        fit,
        EnsureTyped("image", data_type="numpy", dtype=np.float32, track_meta=False),
    ])


def bundle_preprocessing(cfg: DataConfig) -> list[dict]:
    """The MONAI bundle config (`monai.bundle.ConfigParser` syntax) of the chain a NIfTI scan with a set affine
    (sform/qform) goes through here: load -> channel first -> orientation (-> spacing) -> row-major spatial axes ->
    intensity -> resize. Mirrors `_load_nifti`, `_canonical` (a 2D scan: an axial slice), `_to_channel_first`
    (single-channel) and `preprocess_transform`; a test keeps both equal on real files."""
    rank = len(cfg.spatial_size)
    intensity = cfg.intensity
    if isinstance(intensity, CTWindow):
        lo, hi = intensity.center - intensity.width / 2, intensity.center + intensity.width / 2
        scale = {"_target_": "ScaleIntensityRanged", "a_min": lo, "a_max": hi, "b_min": 0.0, "b_max": 1.0, "clip": True}
    elif isinstance(intensity, Percentile):
        scale = {"_target_": "ScaleIntensityRangePercentilesd", "lower": intensity.lower, "upper": intensity.upper,
                 "b_min": 0.0, "b_max": 1.0, "clip": True}
    else:
        scale = {"_target_": "ScaleIntensityd", "minv": 0.0, "maxv": 1.0}
    chain = [
        {"_target_": "LoadImaged", "reader": "NibabelReader", "image_only": True, "dtype": "$np.float32"},
        {"_target_": "EnsureChannelFirstd", "channel_dim": "no_channel"},
        {"_target_": "Orientationd", "axcodes": cfg.orientation},
        *([{"_target_": "Spacingd", "pixdim": list(cfg.spacing), "mode": "bilinear"}] if cfg.spacing else []),
        # NIfTI (x, y[, z]) -> medfdd's row-major ([z,] y, x)
        {"_target_": "Transposed", "indices": [0, *range(rank, 0, -1)]},
        *([{"_target_": "RepeatChanneld", "repeats": 3}] if cfg.channels == 3 else []),
        scale,
        {"_target_": "ResizeWithPadOrCropd", "spatial_size": list(cfg.spatial_size)} if cfg.fit == "crop_or_pad" else
        {"_target_": "Resized", "spatial_size": list(cfg.spatial_size), "mode": "bilinear" if rank == 2 else "trilinear",
         "anti_aliasing": True},
        {"_target_": "EnsureTyped", "data_type": "tensor", "dtype": "$torch.float32"},
    ]
    return [{**t, "keys": "image"} for t in chain]


def load_scan(path: Path, *, root: Path, cfg: DataConfig, transform=None) -> tuple[np.ndarray, ScanInfo]:
    """Read, validate and preprocess one scan (file, or folder = DICOM series) -> ([C, *spatial_size], info)."""
    path = Path(path)
    fmt = detect_format(path) if cfg.format == "auto" else cfg.format
    if fmt == "dicom":
        arr, rgb, info = _load_dicom(path, root, cfg)
    elif fmt == "nifti":
        arr, rgb, info = _load_nifti(path, root, cfg)
    else:
        arr, rgb, info = _load_png(path, cfg)
    data = _to_channel_first(arr, rgb, len(cfg.spatial_size), cfg.channels)
    if not np.isfinite(data).all():
        n = int((~np.isfinite(data)).sum())
        raise RecordRejected(Reason.NON_FINITE, f"{n} NaN/Inf value(s)", "fix or re-export the scan")
    if float(data.max()) == float(data.min()):
        raise RecordRejected(Reason.CONSTANT_IMAGE, f"every value is {float(data.min())}",
                             "remove blank scans from the manifest")
    out = (transform or preprocess_transform(cfg))({"image": data})["image"]
    out = np.asarray(out, dtype=np.float32)
    if not np.isfinite(out).all():
        raise RecordRejected(Reason.CONSTANT_IMAGE, "no intensity range left after preprocessing",
                             "check data.intensity (e.g. percentile bounds)")
    return out, info
