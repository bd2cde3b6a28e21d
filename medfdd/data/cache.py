"""Preprocessing cache: decoded + preprocessed tensors keyed by file content and preprocessing settings.

A key is the BLAKE2b hash of the scan's bytes (every slice of a series, with names) and of the settings that
shape the tensor, so editing a file, swapping it, or changing spatial_size / intensity / channels invalidates
its entry. Labels are never cached (they come from the manifest on every run). Entries are `.npy` files written
atomically and read with `allow_pickle=False`; an unreadable entry is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import stat
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

from medfdd.config import DataConfig
from medfdd.data.quarantine import Reason, RecordRejected
from medfdd.io import atomic_save_npy, atomic_write_json

T = TypeVar("T")
PREPROCESS_VERSION = 1  # bump when the loading/preprocessing code changes what it produces


def settings_fingerprint(cfg: DataConfig) -> str:
    settings = {"v": PREPROCESS_VERSION, "format": cfg.format, "spatial_size": list(cfg.spatial_size),
                "channels": cfg.channels, "intensity": cfg.intensity.model_dump(mode="json"),
                "orientation": cfg.orientation, "spacing": cfg.spacing}
    return hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=16).hexdigest()


def content_key(path: Path, fingerprint: str, root: Path) -> str:
    """Hash of the scan's bytes (two rows with equal keys are the same scan); only regular files inside `root` are read (a series slice that is a symlink to
    /dev/zero, a FIFO or a file elsewhere is quarantined before a single byte of it is read)."""
    h = hashlib.blake2b(fingerprint.encode(), digest_size=20)
    files = sorted(p for p in path.iterdir() if not p.name.startswith(".")) if path.is_dir() else [path]
    root = Path(root).resolve()
    for f in files:
        target = f.resolve()
        if not target.is_relative_to(root):
            raise RecordRejected(Reason.OUTSIDE_ROOT, f"{f.name} resolves outside the data root",
                                 "copy the file into the data root")
        if target.is_dir():
            continue  # a sub-folder in a series folder: the loader quarantines it with its own reason
        if not stat.S_ISREG(target.stat().st_mode):
            raise RecordRejected(Reason.UNREADABLE, f"{f.name} is not a regular file (a device, FIFO or socket)",
                                 "export the scan as an ordinary file")
        if f is not path:  # a series slice's name orders it; a single file's own name is not content
            h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


class PreprocessCache:
    """Content-addressed store of preprocessed tensors under `folder`."""

    def __init__(self, folder: Path, cfg: DataConfig):
        self.folder = Path(folder)
        self.fingerprint = settings_fingerprint(cfg)
        self.hits = self.misses = 0

    def _file(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.npy"

    def has(self, key: str) -> bool:
        """Whether an entry is stored for `key` (not counted as a hit or a miss; `get` may still find it unreadable)."""
        return self._file(key).exists()

    def get(self, key: str, parse_info: Callable[[dict], T]) -> tuple[np.ndarray, T] | None:
        """(tensor, parse_info(info)) or None on a miss; an unreadable entry, or info that `parse_info` refuses
        (another version's fields), counts as a miss."""
        f = self._file(key)
        try:
            arr = np.load(f, allow_pickle=False)
            info = parse_info(json.loads(f.with_suffix(".json").read_text()))
        except (ValueError, OSError, EOFError, TypeError, KeyError):
            self.misses += 1
            return None
        self.hits += 1
        return arr, info

    def put(self, key: str, array: np.ndarray, info: dict) -> None:
        # info first: the .npy marks completion; no fsync (a lost entry is simply recomputed)
        atomic_write_json(self._file(key).with_suffix(".json"), info, durable=False)
        atomic_save_npy(self._file(key), array.astype(np.float32, copy=False), durable=False)
