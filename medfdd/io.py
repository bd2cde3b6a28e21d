"""Atomic file writes: a reader sees the old file or the new one, never a torn one (write temp, fsync, rename)."""

from __future__ import annotations

import errno
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from medfdd.errors import MedfddError


class OutputWriteError(MedfddError, OSError):
    """A file could not be written (disk full, read-only, a file where a folder should be); the old file is intact.

    Also an OSError, so callers that treat any OSError as "not written" (the privacy ledger) keep doing so.
    """

    def __str__(self) -> str:  # OSError's own str would print only errno and file name
        return f"{self.where}: {self.problem}. Fix: {self.fix}"


def write_error(path: Path, e: OSError) -> OutputWriteError:
    code = errno.errorcode.get(e.errno or 0, "")
    if e.errno == errno.ENOSPC or e.errno == errno.EDQUOT:
        fix = f"free space on the disk holding {path.parent} (or set `output` to another disk) and run again"
    elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        fix = f"make {path.parent} writable, or set `output` to a writable folder, and run again"
    elif e.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        fix = f"a file or folder is in the way on the path to {path}: move it, or set `output` elsewhere"
    else:
        fix = "check the output folder and the disk, then run again"
    err = OutputWriteError(str(path), f"cannot be written: {e.strerror or e} ({code or e.errno}); "
                           "the previous version, if any, is unchanged", fix)
    err.errno, err.strerror, err.filename = e.errno, e.strerror, str(path)
    return err


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> Path:
    """Write `data` to `path` atomically: temp file in the same folder, fsync, os.replace, fsync the folder.

    durable=False skips the fsyncs (still never torn: readers see the old or the new file) for disposable caches.
    Any OS failure raises `OutputWriteError` naming the file and the fix; the temp file is removed.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        if durable:
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except OSError as e:
        raise write_error(path, e) from e
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
    return path


def atomic_write_text(path: Path, text: str, durable: bool = True) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), durable)


def json_safe(x: Any) -> Any:
    """`x` (nested dicts, lists, tuples) with each non-finite float as the string "inf", "-inf" or "nan": JSON has no
    such numbers, and an epsilon of a non-private run is infinite. `json_number` reads them back."""
    if isinstance(x, float) and not math.isfinite(x):
        return "inf" if x > 0 else ("-inf" if x < 0 else "nan")
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [json_safe(v) for v in x]
    return x


def json_number(v: Any) -> float:
    """A number as `json_safe` wrote it ("inf", "-inf", "nan" or a JSON number); TypeError for anything else."""
    if isinstance(v, str) and v in ("inf", "-inf", "nan"):
        return float(v)
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise TypeError(f"{v!r} is not a number")
    return float(v)


def atomic_write_json(path: Path, obj: Any, durable: bool = True) -> Path:
    """Indented JSON; NaN/inf are refused (they are not JSON: pass the object through `json_safe` first)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n", durable)


def atomic_save_npy(path: Path, array: np.ndarray, durable: bool = True) -> Path:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return atomic_write_bytes(path, buf.getvalue(), durable)


def atomic_save_npz(path: Path, **arrays: np.ndarray) -> Path:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.ascontiguousarray(v) for k, v in arrays.items()})
    return atomic_write_bytes(path, buf.getvalue())
