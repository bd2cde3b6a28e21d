"""A view of some of a site's records that reads only the rows asked for: the distiller's real data, out of core.

`RecordView(images, index)` stands where a [n, C, *spatial] tensor stood: `len`, `shape`, `to(device)` and
`view[idx]` (an index tensor, e.g. a Poisson sample, or a slice: a batch) -> the float32 rows `images[index[idx]]` on the view's device.
`take` and `concat` select and join records without reading them when given views (plain arrays: as numpy does).
Over a memory map (`cache.SiteStore`), the pages read are released after each read, so the process's resident memory
does not grow with the site: only the sampled rows are ever in memory.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Iterator

import numpy as np
import torch

CHUNK_BYTES = 64 << 20  # `chunks` reads this much at a time
DEVICE_RESIDENT_BYTES = 4 << 30  # `to(accelerator)`: a site up to this size is held on the device


class RecordView:
    def __init__(self, images: np.ndarray, index: np.ndarray, device: torch.device | str = "cpu"):
        self.images, self.index = images, np.asarray(index, dtype=np.int64)
        self.device = torch.device(device)
        self.shape = (len(self.index), *images.shape[1:])
        self.dtype = torch.float32

    def __len__(self) -> int:
        return len(self.index)

    def to(self, device: torch.device | str) -> RecordView | torch.Tensor:
        """The view gathering onto `device`; on an accelerator, a site of at most `DEVICE_RESIDENT_BYTES` is copied
        there whole instead (a chunk at a time through host memory), so that a step's gather stays on the device."""
        device = torch.device(device)
        if device.type == "cpu" or 4 * math.prod(self.shape) > DEVICE_RESIDENT_BYTES:
            return RecordView(self.images, self.index, device)
        out = torch.empty(self.shape, dtype=torch.float32, device=device)
        done = 0
        for chunk in self.chunks():
            out[done:done + len(chunk)] = torch.from_numpy(chunk).to(device)
            done += len(chunk)
        return out

    def _release(self) -> None:
        """Let the kernel drop the mapped pages from this process (they stay in the page cache, re-read on demand)."""
        m = getattr(self.images, "_mmap", None)  # np.memmap's mapping (np.load(mmap_mode="r"))
        if isinstance(m, mmap.mmap) and hasattr(m, "madvise"):
            m.madvise(mmap.MADV_DONTNEED)

    def rows(self, idx: torch.Tensor | np.ndarray | slice) -> np.ndarray:
        """The records at view positions `idx` (indices or a slice), in that order, as an in-memory float32 array."""
        if isinstance(idx, slice):
            positions = np.arange(len(self))[idx]
        else:
            positions = idx.detach().cpu().numpy() if isinstance(idx, torch.Tensor) else np.asarray(idx)
        out = np.ascontiguousarray(self.images[self.index[positions]], dtype=np.float32)
        self._release()
        return out

    def __getitem__(self, idx: torch.Tensor | slice) -> torch.Tensor:
        return torch.from_numpy(self.rows(idx)).to(self.device)

    def subset(self, positions: np.ndarray) -> RecordView:
        """The records at view positions `positions`, as a view: nothing is read."""
        return RecordView(self.images, self.index[np.asarray(positions, dtype=np.int64)], self.device)

    def followed_by(self, other: RecordView) -> RecordView:
        """This view's records, then `other`'s (a view of the same records array): nothing is read."""
        if other.images is not self.images:
            raise ValueError("RecordView.followed_by: both views must read the same records array")
        return RecordView(self.images, np.r_[self.index, other.index], self.device)

    def chunks(self) -> Iterator[np.ndarray]:
        """Every record in view order, a few MiB at a time (digests, batched evaluation)."""
        step = max(1, CHUNK_BYTES // max(1, 4 * math.prod(self.shape[1:])))
        for start in range(0, len(self), step):
            yield self.rows(np.arange(start, min(len(self), start + step)))


def byte_chunks(records: np.ndarray | torch.Tensor | RecordView) -> Iterator[bytes | memoryview]:
    """dtype and shape, then the raw values, for digests: a view is read a chunk at a time, an array is not copied
    (an array and a view of the same values give the same bytes)."""
    if isinstance(records, RecordView):
        yield f"{np.dtype(np.float32).str}{tuple(records.shape)}".encode()
        for a in records.chunks():
            yield memoryview(a).cast("B")
        return
    a = records.detach().cpu().numpy() if isinstance(records, torch.Tensor) else records
    a = np.ascontiguousarray(a)
    yield f"{a.dtype.str}{a.shape}".encode()
    yield memoryview(a).cast("B")


def take(records: np.ndarray | RecordView, positions: np.ndarray) -> np.ndarray | RecordView:
    """`records[positions]`; a view stays a view (nothing is read)."""
    return records.subset(positions) if isinstance(records, RecordView) else records[positions]


def concat(first: np.ndarray | RecordView, second: np.ndarray | RecordView) -> np.ndarray | RecordView:
    """`first` then `second`; two views of the same records stay a view (nothing is read)."""
    if isinstance(first, RecordView) and isinstance(second, RecordView):
        return first.followed_by(second)
    return np.concatenate([_read(first), _read(second)])


def _read(records: np.ndarray | RecordView) -> np.ndarray:
    return records.rows(slice(None)) if isinstance(records, RecordView) else np.asarray(records)
