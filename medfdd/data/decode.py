"""Parallel decoding: scans read and preprocessed by worker processes ahead of the caller, consumed in order.

The caller (`site_data.load_site_data`) keeps every decision (duplicates, cache, quarantine) in manifest order; this
module only moves the expensive `load_scan` calls into a `ProcessPoolExecutor` (spawn context: torch and fork do
not mix) a bounded window ahead. A worker returns the array or the rejection (reason, detail, fix) in memory, so the
outcome of a scan, and therefore the site's arrays and quarantine report, do not depend on the number of workers.
With one worker nothing is spawned and every scan is decoded in this process, as `load_scan` alone would.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np

from medfdd.config import DataConfig
from medfdd.data.load import ScanInfo, load_scan, preprocess_transform
from medfdd.data.quarantine import Reason, RecordRejected, as_rejection

AUTO_ROWS_PER_WORKER = 2000  # `workers: auto` spawns one process per this many rows (a start costs 3-10 s)
AHEAD_PER_WORKER = 8  # scans in flight per worker: enough to hide the round trip, few arrays held in memory

Outcome = tuple[np.ndarray, ScanInfo] | tuple[Reason, str, str]  # (array, info) or a rejection (reason, detail, fix)


def available_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def decode_workers(setting: int | str, n_rows: int) -> int:
    """Processes for a site of `n_rows` rows: the configured number, or under `auto` the cores, one per
    `AUTO_ROWS_PER_WORKER` rows (a small site decodes in this process: spawning would cost more than it saves)."""
    if setting != "auto":
        return int(setting)
    return max(1, min(available_cores(), n_rows // AUTO_ROWS_PER_WORKER))


_worker: dict = {}  # per worker process: the root, data settings and transform (set once by `_start_worker`)


def _start_worker(root: str, cfg: DataConfig) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it then stops the pool
    import torch

    torch.set_num_threads(1)  # one core per worker: the workers are the parallelism
    _worker.update(root=Path(root), cfg=cfg, transform=preprocess_transform(cfg))


def _decode_in_worker(path: str) -> Outcome:
    try:
        return load_scan(Path(path), root=_worker["root"], cfg=_worker["cfg"], transform=_worker["transform"])
    except Exception as err:  # noqa: BLE001 - one file's failure is that row's quarantine entry, as in-process
        r = as_rejection(err)
        return r.reason, r.detail, r.fix


class ScanDecoder:
    """`load(key, path)` returns what `load_scan` would for that scan; `ahead(key, path)` starts it early.

    Keys are content keys (`cache.content_key`): one decode per distinct content. A rejection is kept (small) and
    raised again for a later row of the same content; an array is handed out once (the caller then reuses it).
    """

    def __init__(self, root: Path, cfg: DataConfig, workers: int):
        self.root, self.cfg, self.workers = Path(root), cfg, workers
        self.transform = preprocess_transform(cfg)
        self.window = workers * AHEAD_PER_WORKER if workers > 1 else 0
        self._pool: ProcessPoolExecutor | None = None
        self._pending: dict[str, Future] = {}
        self._failed: dict[str, tuple[Reason, str, str]] = {}

    def __enter__(self) -> ScanDecoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._pool is not None:  # on an error or Ctrl-C: drop the queued scans, do not wait for them
            self._pool.shutdown(wait=not self._pending, cancel_futures=True)
            self._pool, self._pending = None, {}

    @property
    def parallel(self) -> bool:
        return self.workers > 1

    def ahead(self, key: str, path: Path) -> None:
        """Start decoding `path` in a worker (once per key); a no-op with one worker."""
        if not self.parallel or key in self._pending or key in self._failed:
            return
        if self._pool is None:  # spawned on the first scan to decode: a fully cached site starts no process
            self._pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=_start_worker, initargs=(str(self.root), self.cfg))
        self._pending[key] = self._pool.submit(_decode_in_worker, str(path))

    def load(self, key: str, path: Path) -> tuple[np.ndarray, ScanInfo]:
        """The decoded scan, or the RecordRejected it raised (the worker's, or this process's without one)."""
        if key in self._failed:
            raise RecordRejected(*self._failed[key])
        future = self._pending.pop(key, None)
        if future is None:
            return load_scan(path, root=self.root, cfg=self.cfg, transform=self.transform)
        outcome = future.result()
        if isinstance(outcome[0], np.ndarray):
            return outcome
        self._failed[key] = outcome
        raise RecordRejected(*outcome)
