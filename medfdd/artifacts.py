"""What leaves a site: the synthetic set (npz + json, allow-listed keys only) and model weights (safetensors).

Nothing here is ever unpickled: npz is read with allow_pickle=False, weights with safetensors.
"""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save
from torch import nn

from medfdd import __version__
from medfdd.charts import png_bytes, pyplot
from medfdd.errors import MedfddError
from medfdd.io import atomic_save_npz, atomic_write_bytes, atomic_write_json, json_safe
from medfdd.nets import ConvNet, model_from_arch

NPZ_KEYS = ("images", "labels")
META_KEYS = ("site_id", "round", "method", "ipc", "classes", "spatial_size", "channels", "epsilon", "epsilon_round",
             "delta", "accountant", "noise_multiplier", "sample_rate", "steps", "clip_norm", "dp", "medfdd_version",
             "class_evidence", "allocation", "privacy_unit", "noise_source")
# privacy_unit: what epsilon protects, `scan` or `patient` (absent in artifacts of medfdd before it: scan);
# noise_source: `keyed` (the site's noise key) or `secure` (OS randomness; absent before it: keyed);
# class_evidence: noisy counts / sample rate, post-processing of the paid release; allocation: `evidence` when the
# images per class were shared by that evidence (absent otherwise)


class ArtifactError(MedfddError):
    """A synthetic set or model file is missing, malformed or does not match what was agreed."""


@dataclass
class SyntheticSet:
    images: np.ndarray  # float32 [N, C, *spatial]
    labels: np.ndarray  # int64 [N]
    meta: dict

    def __post_init__(self):
        unknown = set(self.meta) - set(META_KEYS)
        if unknown:  # invariant 5: the payload is an allow-list
            raise ArtifactError("synthetic.json", f"keys outside the allow-list: {sorted(unknown)}",
                                "only declared metadata may leave a site")


def save_synthetic(out_dir: Path, syn: SyntheticSet) -> tuple[Path, Path]:
    """Atomically write synthetic.npz (images, labels) then synthetic.json (metadata)."""
    out_dir = Path(out_dir)
    npz = atomic_save_npz(out_dir / "synthetic.npz", images=syn.images.astype(np.float32),
                          labels=syn.labels.astype(np.int64))
    meta = {k: json_safe(v) for k, v in {**syn.meta, "medfdd_version": __version__}.items()}
    return npz, atomic_write_json(out_dir / "synthetic.json", meta)


def load_synthetic(folder: Path) -> SyntheticSet:
    folder = Path(folder)
    npz, meta_path = folder / "synthetic.npz", folder / "synthetic.json"
    for f in (npz, meta_path):
        if not f.is_file():
            raise ArtifactError(str(f), "missing", "run `medfdd site distill` first")
    try:
        with np.load(npz, allow_pickle=False) as z:
            if sorted(z.files) != sorted(NPZ_KEYS):
                raise ArtifactError(str(npz), f"arrays {sorted(z.files)}, expected {list(NPZ_KEYS)}",
                                    "only images and labels may be in a synthetic set")
            images, labels = z["images"], z["labels"]
    except (ValueError, OSError) as e:
        raise ArtifactError(str(npz), f"unreadable ({e})", "re-run the site distillation") from None
    meta = json.loads(meta_path.read_text())
    meta = {k: (math.inf if v == "inf" else v) for k, v in meta.items()}
    return SyntheticSet(images, labels, meta)


def _as_rgb(img: np.ndarray) -> np.ndarray:
    """One image [C, H, W] or volume [C, D, H, W] (middle slice) as an RGB array [H, W, 3] clipped to [0, 1]."""
    if img.ndim == 4:
        img = img[:, img.shape[1] // 2]
    img = np.clip(np.asarray(img, dtype=np.float32), 0, 1)
    return np.repeat(img[0][..., None], 3, axis=-1) if img.shape[0] == 1 else np.moveaxis(img[:3], 0, -1)


def preview_mosaic(images: np.ndarray, labels: np.ndarray, num_classes: int, *, max_cols: int | None = None,
                   gap: int = 2) -> np.ndarray:
    """The preview grid as one RGB array: row k holds the first `max_cols` images of class k (volumes: middle
    slice), cells separated and padded by white."""
    per_class = [np.where(labels == k)[0][:max_cols] for k in range(num_classes)]
    cols = max(1, max((len(p) for p in per_class), default=0))
    h, w = _as_rgb(images[0]).shape[:2] if len(images) else (1, 1)
    mosaic = np.ones((num_classes * (h + gap) - gap, cols * (w + gap) - gap, 3), dtype=np.float32)
    for k, idx in enumerate(per_class):
        for j, i in enumerate(idx):
            mosaic[k * (h + gap):k * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = _as_rgb(images[i])
    return mosaic


def preview_png(images: np.ndarray, labels: np.ndarray, classes: list[str], title: str = "", *,
                max_cols: int | None = None, cell: float = 0.9, dpi: int = 80, gap: int = 2) -> bytes:
    """PNG bytes of `preview_mosaic` with the class names on the rows, drawn by a single `imshow` (one axes per
    image made a 100-image preview take seconds)."""
    plt = pyplot()
    mosaic = preview_mosaic(images, labels, len(classes), max_cols=max_cols, gap=gap)
    h, w = _as_rgb(images[0]).shape[:2] if len(images) else (1, 1)
    cols = (mosaic.shape[1] + gap) // (w + gap)
    fig, ax = plt.subplots(figsize=(cell * cols + 1.2, cell * len(classes) + 0.4))
    ax.imshow(mosaic, interpolation="nearest", aspect="equal")
    ax.set_xticks([])
    ax.set_yticks([k * (h + gap) + (h - 1) / 2 for k in range(len(classes))], list(classes), fontsize=8)
    ax.tick_params(left=False)
    for s in ax.spines.values():
        s.set_visible(False)
    if title:
        ax.set_title(title, fontsize=9)
    return png_bytes(fig, dpi)


def save_preview(path: Path, images: np.ndarray, labels: np.ndarray, classes: list[str], title: str = "", *,
                 max_cols: int | None = None) -> Path:
    """The per-class PNG preview grid of a synthetic set (see `preview_png`; `max_cols`: at most that many images
    per class)."""
    return atomic_write_bytes(Path(path), preview_png(images, labels, classes, title, max_cols=max_cols))


def volume_affine(shape: tuple[int, int, int], orientation: str = "RAS",
                  voxel_size: list[float] | None = None) -> np.ndarray:
    """The voxel-to-RAS+ affine (NIfTI-1 sform) of a preprocessed volume stored as (x, y, z) = its `orientation`
    axes (`data.orientation`, the axes MONAI `Orientation` gave it): each column the axis' direction in RAS+ times
    its voxel size (`voxel_size`, else a nominal 1 mm), the volume's centre at the origin (a synthetic volume belongs
    to no scanner position)."""
    from nibabel.orientations import axcodes2ornt

    direction = np.zeros((3, 3))
    for axis, (row, sign) in enumerate(axcodes2ornt(tuple(orientation.upper()))):  # RAS+ axis and sign per axis
        direction[int(row), axis] = sign
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(voxel_size or [1.0, 1.0, 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape, dtype=np.float64) - 1) / 2)
    return affine


def save_volumes_nifti(path: Path, images: np.ndarray, *, orientation: str = "RAS",
                       voxel_size: list[float] | None = None) -> Path:
    """3D synthetic sets as one 4D NIfTI-1 (x, y, z, N) of the first channel, for viewing in a medical viewer: the
    site's orientation and, when fixed (`DataConfig.voxel_size`), its voxel size in mm as sform and qform (code 2,
    aligned); otherwise 1 mm, which the header's description calls nominal."""
    import nibabel as nib

    vols = images[:, 0].transpose(3, 2, 1, 0)  # [N, D, H, W] -> (x, y, z, N): row-major back to the orientation axes
    affine = volume_affine(vols.shape[:3], orientation, voxel_size)
    img = nib.Nifti1Image(np.ascontiguousarray(vols.astype(np.float32)), affine)
    img.set_sform(affine, code=2)
    img.set_qform(affine, code=2)
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = (b"medfdd synthetic volumes" if voxel_size else
                             b"medfdd synthetic volumes; voxel size nominal (resized scans)")
    return atomic_write_bytes(Path(path), gzip.compress(img.to_bytes(), mtime=0))


def save_model(path: Path, model: nn.Module) -> Path:
    """Weights as safetensors with the architecture in the header metadata."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return atomic_write_bytes(Path(path), save(state, metadata={"arch": json.dumps(model.arch),
                                                                "medfdd_version": __version__}))


def load_model(path: Path, expect: dict | None = None) -> nn.Module:
    """Load a model written by `save_model` (ConvNet-3 or an allow-listed MONAI network, as its header says);
    `expect` (e.g. in_channels, num_classes, spatial_size) must match the header."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(str(path), "model file not found", "pass the global model written by the coordinator")
    try:
        with safe_open(str(path), framework="pt") as f:
            arch = json.loads((f.metadata() or {}).get("arch", "null"))
        state = load_file(str(path))
    except Exception as e:
        raise ArtifactError(str(path), f"not a readable safetensors file ({type(e).__name__})",
                            "pass the global model written by the coordinator") from None
    if not isinstance(arch, dict):
        raise ArtifactError(str(path), "no architecture metadata", "use a model written by medfdd")
    if expect:
        bad = {k: (arch.get(k), v) for k, v in expect.items() if arch.get(k) != v}
        if bad:
            raise ArtifactError(str(path), f"architecture does not match the agreed one: {bad} (got, expected)",
                                "the coordinator and the sites must agree on classes, channels and spatial size")
    try:
        with torch.device("meta"):  # shapes only: a header announcing a huge width allocates nothing
            skeleton = model_from_arch(arch)
    except (KeyError, TypeError, ValueError) as e:
        raise ArtifactError(str(path), f"architecture metadata unusable ({type(e).__name__}: {e})"[:300],
                            "use a model written by medfdd") from None
    # a model written before the convolutions lost their bias loads too: instance norm subtracts a conv bias exactly
    conv_biases = {f"features.{i}.bias" for i, m in enumerate(skeleton.features)
                   if isinstance(m, nn.Conv2d | nn.Conv3d)} if isinstance(skeleton, ConvNet) else set()
    state = {k: v for k, v in state.items() if k not in conv_biases}
    declared = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    if declared != {k: tuple(v.shape) for k, v in state.items()}:
        raise ArtifactError(str(path), "the weights' shapes do not match the architecture in the header",
                            "use the model file as the coordinator wrote it")
    model = model_from_arch(arch)
    try:
        model.load_state_dict({k: torch.as_tensor(v) for k, v in state.items()}, strict=True)
    except RuntimeError as e:
        raise ArtifactError(str(path), f"weights do not fit the declared architecture: {str(e)[:300]}",
                            "use the model file as the coordinator wrote it") from None
    return model.eval()


def load_agreed_model(path: Path, *, in_channels: int, num_classes: int, spatial_size) -> nn.Module:
    """A consortium's global model as a site accepts it: the agreed architecture (`load_model` with `expect`) and
    finite weights; anything else is refused with an ArtifactError naming the file."""
    model = load_model(path, expect={"in_channels": int(in_channels), "num_classes": int(num_classes),
                                     "spatial_size": [int(s) for s in spatial_size]})
    bad = [k for k, v in model.state_dict().items() if v.is_floating_point() and not v.isfinite().all()]
    if bad:
        raise ArtifactError(str(path), f"weights hold NaN/Inf values ({', '.join(bad[:3])})",
                            "the coordinator must send a finite model; nothing was done with this one")
    return model
