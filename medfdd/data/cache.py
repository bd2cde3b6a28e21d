"""Preprocessing cache: decoded + preprocessed tensors keyed by file content and preprocessing settings.

A key is the BLAKE2b hash of the scan's bytes (every slice of a series, with names) and of the settings that
shape the tensor, so editing a file, swapping it, or changing spatial_size / intensity / channels invalidates
its entry. Labels are never cached (they come from the manifest on every run). Entries are `.npy` files written
atomically and read with `allow_pickle=False`; an unreadable entry is recomputed.

`SiteStore` is the site's storage: every load writes the kept records, in order, into one `.npy` file (under
output/records), then reads it memory-mapped, so a site larger than memory is read by index, never held whole.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np

from medfdd.config import DataConfig
from medfdd.data.quarantine import Reason, RecordRejected
from medfdd.io import atomic_save_npy, atomic_write_json, write_error

T = TypeVar("T")
PREPROCESS_VERSION = 1  # bump when the loading/preprocessing code changes what it produces


def settings_fingerprint(cfg: DataConfig) -> str:
    settings = {"v": PREPROCESS_VERSION, "format": cfg.format, "spatial_size": list(cfg.spatial_size),
                "channels": cfg.channels, "intensity": cfg.intensity.model_dump(mode="json"),
                "orientation": cfg.orientation, "spacing": cfg.spacing,
                **({"fit": cfg.fit} if cfg.fit != "resize" else {})}  # the default's keys as they were: caches kept
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


class SiteStore:
    """One site's preprocessed records, appended one by one to a `.npy` file and published atomically.

    Records go to disk with plain file writes (never through a mapping), so the site's pixels do not stay in this
    process's memory while it loads; `finish` renames the finished file into place and opens it memory-mapped
    (`np.load(mmap_mode="r", allow_pickle=False)`), to be read by index (`records.RecordView`). The header is written
    for the manifest's row count and rewritten in place for the rows kept (numpy leaves room to change axis 0).
    """

    def __init__(self, path: Path, capacity: int, record_shape: tuple[int, ...]):
        self.path = Path(path)
        self.record_shape = tuple(record_shape)
        self.row_bytes = 4 * math.prod(self.record_shape)
        self.n = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            self._tmp = Path(tmp)
            self._file = os.fdopen(fd, "r+b", buffering=0)
            self.offset = self._write_header(capacity)
        except OSError as e:
            self.close()
            raise write_error(self.path, e) from e

    def _write_header(self, rows: int) -> int:
        self._file.seek(0)
        np.lib.format.write_array_header_1_0(self._file, {"descr": "<f4", "fortran_order": False,
                                                          "shape": (rows, *self.record_shape)})
        return self._file.tell()

    def _io(self, fn, *args):
        try:
            return fn(*args)
        except OSError as e:
            self.close()
            raise write_error(self.path, e) from e

    def append(self, record: np.ndarray) -> int:
        """Write one record [*record_shape] after the others; returns its position."""
        data = np.ascontiguousarray(record, dtype="<f4")
        if data.shape != self.record_shape:
            raise ValueError(f"record of shape {data.shape}, the store holds {self.record_shape}")
        self._io(os.pwrite, self._file.fileno(), data.data, self.offset + self.n * self.row_bytes)
        self.n += 1
        return self.n - 1

    def read(self, pos: int) -> np.ndarray:
        raw = self._io(os.pread, self._file.fileno(), self.row_bytes, self.offset + pos * self.row_bytes)
        return np.frombuffer(raw, dtype="<f4").reshape(self.record_shape).copy()

    def keep(self, positions: list[int]) -> None:
        """Keep only the records at `positions` (ascending), moved down in order, one record at a time."""
        for new, old in enumerate(positions):
            if new != old:
                self._io(os.pwrite, self._file.fileno(), self.read(old).data, self.offset + new * self.row_bytes)
        self.n = len(positions)

    def finish(self) -> np.ndarray:
        """Publish the file (header for the records written, atomically renamed) -> read-only memory map [n, ...]."""
        if self._io(self._write_header, self.n) != self.offset:  # numpy >= 1.23 pads for this; a guard
            raise RuntimeError(f"{self.path}: the .npy header changed length when rewritten")
        self._io(os.ftruncate, self._file.fileno(), self.offset + self.n * self.row_bytes)
        self._file.close()
        self._io(os.replace, self._tmp, self.path)
        self._tmp = None
        if self.n == 0:  # nothing to map
            return np.empty((0, *self.record_shape), dtype=np.float32)
        return np.load(self.path, mmap_mode="r", allow_pickle=False)

    def close(self) -> None:
        """Drop an unfinished store (its temp file)."""
        f = getattr(self, "_file", None)
        if f is not None and not f.closed:
            f.close()
        if getattr(self, "_tmp", None) is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None

    def __enter__(self) -> SiteStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
