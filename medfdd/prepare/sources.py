"""Labelled image sources that `medfdd prepare` turns into a consortium of hospital folders.

Every source returns a `LabelledSource`: a training split (to be partitioned across the sites), the coordinator's test
split and the class names. Images are row-major arrays:

- ``(N, H, W)`` grayscale 2D,
- ``(N, H, W, 3)`` RGB 2D (a 4-D array whose last axis is 3 is always read as RGB),
- ``(N, D, H, W)`` grayscale 3D volumes,

with an integer dtype (uint8 for all bundled sources; uint16/int16 are kept as they are). Labels are int64 class
indices into ``classes``.

Sources:

- ``digits``: scikit-learn's ``load_digits`` (1,797 8x8 images, values 0..16 scaled to 0..255). It has no official
  test split, so a seeded, stratified 25 % is held out as the coordinator's test split.
- ``fashion-mnist``: the idx ``.gz`` files of the Debian package ``dataset-fashion-mnist`` (60k train / 10k test,
  28x28); read with numpy only.
- ``medmnist``: a user-downloaded MedMNIST ``.npz`` (``train_images``, ``train_labels``, ``test_images``,
  ``test_labels``; ``val_*`` may be present). The validation split is deliberately **not** used: it is neither
  site data nor the coordinator's test set (MedMNIST's val split is meant for model selection, and keeping it out keeps
  the official test split comparable with published numbers). Loaded with ``allow_pickle=False``.
"""

from __future__ import annotations

import gzip
import math
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medfdd.errors import MedfddError, SourceUnavailableError

SOURCES = ("digits", "fashion-mnist", "medmnist")

FASHION_MNIST_CLASSES = ["t-shirt_top", "trouser", "pullover", "dress", "coat",
                         "sandal", "shirt", "sneaker", "bag", "ankle-boot"]
FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
FASHION_MNIST_ENV = "MEDFDD_FASHION_MNIST_DIR"
FASHION_MNIST_INSTALL = "apt-get install dataset-fashion-mnist"
# Where the Debian package puts the files (`dpkg -L dataset-fashion-mnist`), plus a few common alternatives.
DEFAULT_FASHION_MNIST_DIRS = (
    Path("/usr/share/datasets/fashion-mnist"),
    Path("/usr/share/fashion-mnist"),
    Path("/usr/local/share/datasets/fashion-mnist"),
)

MEDMNIST_REQUIRED_KEYS = ("train_images", "train_labels", "test_images", "test_labels")

_IDX_DTYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
               0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


class SourceFormatError(MedfddError):
    """A source file exists but its content cannot be used (bad idx header, missing .npz key, wrong shape or dtype)."""


@dataclass(frozen=True)
class LabelledSource:
    """Train and test splits of a labelled image dataset (row-major arrays, int64 labels)."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    classes: list[str]

    @property
    def rgb(self) -> bool:
        return self.train_images.ndim == 4 and self.train_images.shape[-1] == 3

    @property
    def spatial_size(self) -> list[int]:
        """[H, W] for 2D images (grayscale or RGB), [D, H, W] for volumes."""
        shape = self.train_images.shape[1:]
        return [int(s) for s in (shape[:-1] if self.rgb else shape)]

    @property
    def channels(self) -> int:
        return 3 if self.rgb else 1

    @property
    def n_classes(self) -> int:
        return len(self.classes)


# ----------------------------------------------------------------------------------------------------------- digits


def load_digits_source(*, seed: int = 0, test_fraction: float = 0.25) -> LabelledSource:
    """scikit-learn's 8x8 digits; a seeded stratified `test_fraction` becomes the coordinator's test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    labels = bunch.target.astype(np.int64)
    idx_train, idx_test = train_test_split(np.arange(len(labels)), test_size=test_fraction, stratify=labels,
                                           random_state=seed)
    idx_train, idx_test = np.sort(idx_train), np.sort(idx_test)
    return LabelledSource("digits", images[idx_train], labels[idx_train], images[idx_test], labels[idx_test],
                          [str(d) for d in range(10)])


# ---------------------------------------------------------------------------------------------------- fashion-mnist


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (optionally gzip-compressed), the MNIST family's format: magic, big-endian dims, data."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise SourceFormatError(str(path), f"cannot read the file ({e})",
                                f"reinstall the dataset (`{FASHION_MNIST_INSTALL}` as root) or replace the file") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise SourceFormatError(str(path), f"not an idx file (magic bytes {raw[:4].hex() or 'missing'})",
                                "point medfdd at the original idx(.gz) files of the dataset")
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise SourceFormatError(str(path), "truncated idx header", "reinstall the dataset")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(raw) - header != expected:
        raise SourceFormatError(str(path), f"idx header announces {dims} ({expected} bytes of data) but the file "
                                           f"holds {len(raw) - header} bytes", "reinstall the dataset")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def fashion_mnist_dirs() -> list[Path]:
    """The default search directories: $MEDFDD_FASHION_MNIST_DIR (if set), then the Debian package's location."""
    env = os.environ.get(FASHION_MNIST_ENV)
    return ([Path(env)] if env else []) + list(DEFAULT_FASHION_MNIST_DIRS)


def find_fashion_mnist(search_dirs: Sequence[Path | str] | None = None) -> Path:
    """The first directory holding all four Fashion-MNIST idx .gz files (checked directly and in fashion-mnist/)."""
    dirs = [Path(d) for d in (fashion_mnist_dirs() if search_dirs is None else search_dirs)]
    for d in dirs:
        for cand in (d, d / "fashion-mnist"):
            if all((cand / name).is_file() for name in FASHION_MNIST_FILES.values()):
                return cand
    looked = ", ".join(str(d) for d in dirs) or "(no directories)"
    raise SourceUnavailableError(
        "source 'fashion-mnist'",
        f"the idx files ({', '.join(FASHION_MNIST_FILES.values())}) were not found in {looked}",
        f"install the Debian package: `{FASHION_MNIST_INSTALL}` (as root), or set {FASHION_MNIST_ENV} to a folder "
        "holding the four files")


def load_fashion_mnist(*, search_dirs: Sequence[Path | str] | None = None) -> LabelledSource:
    """Fashion-MNIST from the Debian package `dataset-fashion-mnist` (60,000 train / 10,000 test, 28x28 uint8)."""
    folder = find_fashion_mnist(search_dirs)
    arrays = {key: read_idx(folder / name) for key, name in FASHION_MNIST_FILES.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise SourceFormatError(str(folder / FASHION_MNIST_FILES[f"{split}_images"]),
                                    f"{split} images {images.shape} do not match labels {labels.shape}",
                                    "reinstall the dataset")
        if labels.size and (labels.min() < 0 or labels.max() >= len(FASHION_MNIST_CLASSES)):
            raise SourceFormatError(str(folder / FASHION_MNIST_FILES[f"{split}_labels"]),
                                    f"labels outside 0..{len(FASHION_MNIST_CLASSES) - 1}", "reinstall the dataset")
    return LabelledSource("fashion-mnist", arrays["train_images"].astype(np.uint8),
                          arrays["train_labels"].astype(np.int64), arrays["test_images"].astype(np.uint8),
                          arrays["test_labels"].astype(np.int64), list(FASHION_MNIST_CLASSES))


# --------------------------------------------------------------------------------------------------------- medmnist


def _npz_error(path: Path, key: str, problem: str, fix: str) -> SourceFormatError:
    return SourceFormatError(f"{path}: key '{key}'", problem, fix)


def _medmnist_images(path: Path, key: str, a: np.ndarray) -> np.ndarray:
    shapes = "(N, H, W) grayscale, (N, H, W, 3) RGB or (N, D, H, W) volumes"
    if a.ndim not in (3, 4):
        raise _npz_error(path, key, f"images have shape {a.shape}; expected {shapes}",
                         "save the images with one of those shapes (RGB volumes are not supported)")
    if a.shape[0] == 0 or any(s == 0 for s in a.shape):
        raise _npz_error(path, key, f"images have shape {a.shape} (empty)", "save at least one non-empty image")
    if a.dtype in (np.uint8, np.uint16, np.int16):
        return a
    if a.dtype.kind in "biu":
        if a.size and (a.min() < 0 or a.max() > 255):
            raise _npz_error(path, key, f"{a.dtype} values span {a.min()}..{a.max()}",
                             "save uint8 (0..255), uint16 or int16 images")
        return a.astype(np.uint8)
    raise _npz_error(path, key, f"images have dtype {a.dtype}; expected an integer type",
                     "save uint8 images (e.g. np.round(x * 255).astype(np.uint8) for floats in [0, 1])")


def _medmnist_labels(path: Path, key: str, a: np.ndarray, n: int) -> np.ndarray:
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise _npz_error(path, key, f"labels have shape {a.shape}; expected (N,) or (N, 1) class indices "
                                    "(multi-label datasets such as ChestMNIST are not supported)",
                         "save one integer class index per image")
    if len(a) != n:
        raise _npz_error(path, key, f"{len(a)} labels for {n} images", "save exactly one label per image")
    if a.dtype.kind not in "biu" and not (a.dtype.kind == "f" and np.all(np.mod(a, 1) == 0)):
        raise _npz_error(path, key, f"labels have dtype {a.dtype}; expected integer class indices",
                         "save integer class indices 0..K-1")
    a = a.astype(np.int64)
    if a.size and a.min() < 0:
        raise _npz_error(path, key, f"negative label {a.min()}", "save class indices 0..K-1")
    return a


def load_medmnist_npz(path: Path | str) -> LabelledSource:
    """A MedMNIST(-format) .npz: train/test images and labels; `val_*` is ignored on purpose (see the module doc)."""
    path = Path(path)
    if not path.is_file():
        raise SourceUnavailableError(str(path), "MedMNIST .npz file not found",
                                     "download the dataset's .npz (e.g. pathmnist.npz from the MedMNIST release) "
                                     "and pass its path with --npz")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = set(z.files)
            for key in MEDMNIST_REQUIRED_KEYS:
                if key not in keys:
                    raise _npz_error(path, key, f"missing (keys present: {sorted(keys) or 'none'})",
                                     f"save the .npz with the MedMNIST keys {', '.join(MEDMNIST_REQUIRED_KEYS)} "
                                     "(val_images and val_labels are optional and not used)")
            raw = {key: z[key] for key in MEDMNIST_REQUIRED_KEYS}
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise SourceFormatError(str(path), f"not a readable .npz archive ({e})",
                                "pass the .npz file as downloaded (np.savez / np.savez_compressed format)") from None
    except ValueError as e:  # object arrays need pickle, which is never allowed
        raise SourceFormatError(str(path), f"cannot be loaded without unpickling ({e})",
                                "save plain numeric arrays (no object arrays)") from None

    train_x = _medmnist_images(path, "train_images", raw["train_images"])
    test_x = _medmnist_images(path, "test_images", raw["test_images"])
    if train_x.shape[1:] != test_x.shape[1:] or train_x.dtype != test_x.dtype:
        raise _npz_error(path, "test_images", f"shape {test_x.shape[1:]} / dtype {test_x.dtype} differs from "
                                              f"train_images {train_x.shape[1:]} / {train_x.dtype}",
                         "save both splits with the same image shape and dtype")
    train_y = _medmnist_labels(path, "train_labels", raw["train_labels"], len(train_x))
    test_y = _medmnist_labels(path, "test_labels", raw["test_labels"], len(test_x))
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    if n_classes < 2:
        raise _npz_error(path, "train_labels", "only one class (label 0) present", "use a dataset with 2+ classes")
    return LabelledSource("medmnist", train_x, train_y, test_x, test_y, [f"c{k}" for k in range(n_classes)])


# ---------------------------------------------------------------------------------------------------------- dispatch


def load_source(name: str, *, seed: int = 0, npz: Path | str | None = None,
                search_dirs: Sequence[Path | str] | None = None) -> LabelledSource:
    """Load a source by its `medfdd prepare --source` name."""
    if name == "digits":
        return load_digits_source(seed=seed)
    if name == "fashion-mnist":
        return load_fashion_mnist(search_dirs=search_dirs)
    if name == "medmnist":
        if npz is None:
            raise SourceUnavailableError("source 'medmnist'", "no .npz file given",
                                         "pass the downloaded MedMNIST file with --npz PATH")
        return load_medmnist_npz(npz)
    raise SourceUnavailableError(f"source '{name}'", "unknown source", f"use one of {', '.join(SOURCES)}")


def _cap(labels: np.ndarray, n_classes: int, cap: int, rng: np.random.Generator) -> np.ndarray:
    keep = [rng.permutation(np.flatnonzero(labels == c))[:cap] for c in range(n_classes)]
    return np.sort(np.concatenate(keep)).astype(np.int64)


def cap_per_class(source: LabelledSource, max_per_class: int | None, seed: int) -> LabelledSource:
    """At most `max_per_class` training images per class (seeded choice, source order kept).

    The test split is capped in proportion, at ceil(max_per_class * n_test / n_train) per class (at least 1), so a
    small consortium keeps the source's train:test ratio. None returns the source unchanged.
    """
    if max_per_class is None:
        return source
    rng = np.random.default_rng([seed, 11])
    k = source.n_classes
    test_cap = max(1, math.ceil(max_per_class * len(source.test_labels) / max(1, len(source.train_labels))))
    tr = _cap(source.train_labels, k, max_per_class, rng)
    te = _cap(source.test_labels, k, test_cap, rng)
    return LabelledSource(source.name, source.train_images[tr], source.train_labels[tr],
                          source.test_images[te], source.test_labels[te], list(source.classes))
