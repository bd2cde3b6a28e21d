"""A site's data: manifest -> validated, preprocessed tensors + quarantine + patient-level split."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from medfdd.config import SiteConfig
from medfdd.data.cache import PreprocessCache, SiteStore, content_key, settings_fingerprint
from medfdd.data.decode import ScanDecoder, decode_workers
from medfdd.data.load import ScanInfo
from medfdd.data.manifest import read_manifest
from medfdd.data.quarantine import QuarantineEntry, Reason, RecordRejected, as_rejection
from medfdd.data.split import one_scan_per_patient, site_split
from medfdd.io import OutputWriteError


@dataclass
class SiteData:
    classes: list[str]
    images: np.ndarray  # float32 [N, C, *spatial] in [0, 1], read-only memory map of `site_store_path` (read by index)
    labels: np.ndarray  # int64 [N], class indices
    rows: np.ndarray  # int64 [N], manifest line numbers
    patient_ids: list[str | None]
    infos: list[ScanInfo]
    train: np.ndarray  # indices into the arrays above
    holdout: np.ndarray
    n_rows: int  # manifest rows read (used + quarantined)
    quarantine: list[QuarantineEntry] = field(default_factory=list)
    # training patients' further scans, left out under `privacy.unit: patient` (neither member nor holdout)
    unused: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    cache_hits: int = 0
    cache_misses: int = 0
    # manifest rows of different de-duplication groups (patients) that hold the same scan (same bytes or the same
    # DICOM object): each is used as its own record, so that scan's content is protected as a group of that size
    shared_content: list[list[int]] = field(default_factory=list)

    def class_counts(self, subset: np.ndarray | None = None) -> dict[str, int]:
        lab = self.labels if subset is None else self.labels[subset]
        counts = np.bincount(lab, minlength=len(self.classes))
        return {c: int(k) for c, k in zip(self.classes, counts, strict=True)}


def _cached_info(raw: dict) -> ScanInfo:
    """A cache entry's ScanInfo (TypeError / KeyError when another version wrote other fields: a miss)."""
    return ScanInfo(**{**raw, "original_shape": tuple(raw["original_shape"]), "instances": tuple(raw["instances"])})


def site_store_path(cfg: SiteConfig) -> Path:
    """The site's preprocessed records, one memory-mapped `.npy` rewritten by each load (`cache.SiteStore`)."""
    return cfg.output_dir / "records" / "site_records.npy"


def dedup_group(patient_id: str | None) -> str | None:
    """The rows a row is compared with for duplicates: its patient's (one patient id), or the pool of rows without
    a patient id (None)."""
    return patient_id


def load_site_data(cfg: SiteConfig, *, on_record: Callable[[int, int], None] | None = None) -> SiteData:
    """Load every manifest row of a site; unusable rows are quarantined, never dropped silently.

    Duplicates (the same bytes, or the same DICOM object by SOPInstanceUID) are looked for only within one
    `dedup_group`: the first row of a scan stays, a later copy is quarantined, and all copies when their labels
    differ. Which of a patient's rows survive is then a function of that patient's rows alone, so under
    `privacy.unit: patient` adding or removing a patient never changes another patient's records or chosen scan
    (neighbouring manifests stay neighbours: a stable transformation, McSherry 2009). Under `privacy.unit: scan`
    the surviving (image, label) records change by at most one when one row is added or removed, except a second
    file of the same DICOM object with other bytes, which replaces the first when listed before it: a group of 2.
    The same scan under two patients (or under a patient and in the pool without ids) stays two records, listed in
    `shared_content`: its content is protected as a group of that size (`privacy.report.channels`).

    Scans are decoded by `cfg.workers` processes ahead of this loop (`decode.ScanDecoder`); every decision above is
    taken here, in manifest order, so the result is the same for any number of workers.
    `on_record(done, total)` is called after each row (progress bars).
    """
    root = cfg.data_root
    entries, quarantine = read_manifest(root, cfg.data.manifest, cfg.data.classes)
    n_rows = len(entries) + len(quarantine)
    cache = PreprocessCache(cfg.cache_folder, cfg.data) if cfg.data.cache else None
    spatial = tuple(cfg.data.spatial_size)
    store = SiteStore(site_store_path(cfg), len(entries), (cfg.data.channels, *spatial))
    kept: list[int] = []
    infos: list[ScanInfo] = []
    fingerprint = cache.fingerprint if cache else settings_fingerprint(cfg.data)
    # Rows are compared for duplicates only within one de-duplication group: the rows of one patient (one
    # patient_id), or the pool of rows without a patient id (`dedup_group`); see `load_site_data`'s docstring.
    first_of: dict[tuple, int] = {}  # (group, content key) -> position in `kept` of the group's row that held it first
    first_instance: dict[tuple, int] = {}  # (group, SOPInstanceUID digest) -> position in `kept` of the row holding it
    any_of: dict[str, int] = {}  # content key -> a position in `kept` holding those bytes (any group): no reload
    owners: dict[str, dict] = {}  # content key or instance digest -> {group: manifest row}, for `shared_content`
    relabelled: set[int] = set()  # positions whose scan comes again later in its group under another label
    per_patient = cfg.privacy.unit == "patient"
    keys: dict[int, str | Exception] = {}  # row index -> content key (or why it has none), computed a window ahead

    def duplicate(pos: int, e, what: str) -> RecordRejected:
        """The same scan exported twice in one group: one record counted twice by the accountant."""
        first = entries[kept[pos]]
        if first.label != e.label:
            relabelled.add(pos)
        return RecordRejected(Reason.DUPLICATE_ROW, f"{what} as row {first.row}" + (
            "" if first.label == e.label else " with a different label"), "list each scan once")

    def look_ahead(j: int, decoder: ScanDecoder) -> None:
        """Hash row j's file and, unless its content is already loaded or cached, start decoding it."""
        e = entries[j]
        if per_patient and e.patient_id is None:
            return
        try:
            keys[j] = key = content_key(e.file, fingerprint, root)
        except Exception as err:  # noqa: BLE001 - raised again when row j's turn comes
            keys[j] = err
            return
        if key not in any_of and not (cache and cache.has(key)):
            decoder.ahead(key, e.file)

    def load_row(i: int, decoder: ScanDecoder) -> None:
        e = entries[i]
        if per_patient and e.patient_id is None:  # its scans could not be bounded to one per patient
            raise RecordRejected(Reason.NO_PATIENT_ID, "privacy.unit is patient but this row has no patient_id",
                                 "add the patient_id column (the same id for all scans of a patient)")
        key = keys.pop(i)
        if isinstance(key, Exception):
            raise key
        group = dedup_group(e.patient_id)
        if (group, key) in first_of:
            raise duplicate(first_of[(group, key)], e, "same content")
        if key in any_of:  # the same bytes in another group: a separate record, read once
            x, info = store.read(any_of[key]), infos[any_of[key]]
        else:
            cached = cache.get(key, _cached_info) if cache else None
            if cached is not None and cached[0].shape == store.record_shape:
                x, info = cached
            else:
                x, info = decoder.load(key, e.file)
                if cache:
                    cache.put(key, x, asdict(info))
        again = next((first_instance[(group, d)] for d in info.instances if (group, d) in first_instance), None)
        if again is not None:  # other bytes (re-encoded, re-anonymised), same DICOM object
            raise duplicate(again, e, "same DICOM object (SOPInstanceUID)")
        store.append(x)
        first_instance.update(dict.fromkeys(((group, d) for d in info.instances), len(kept)))
        first_of[(group, key)] = len(kept)
        any_of.setdefault(key, len(kept))
        for k in (key, *info.instances):
            owners.setdefault(k, {}).setdefault(group, e.row)
        kept.append(i)
        infos.append(info)

    with store:  # an error or Ctrl-C removes the unfinished file
        with ScanDecoder(root, cfg.data, decode_workers(cfg.workers, len(entries))) as decoder:
            ahead = 0  # rows hashed (and their decoding started) so far
            for i, e in enumerate(entries):
                while ahead < min(len(entries), i + 1 + decoder.window):
                    look_ahead(ahead, decoder)
                    ahead += 1
                try:
                    load_row(i, decoder)
                except OutputWriteError:  # the cache cannot be written (disk full, read-only output): not this scan's fault
                    raise
                except Exception as err:  # noqa: BLE001 - whatever one file does, it must not stop the site
                    r = as_rejection(err)
                    quarantine.append(QuarantineEntry(e.row, e.path, r.reason, r.detail, r.fix))
                if on_record:
                    on_record(i + 1, len(entries))
        if relabelled:  # the first row of a scan listed under two labels is ambiguous too
            for pos in sorted(relabelled):
                e = entries[kept[pos]]
                quarantine.append(QuarantineEntry(e.row, e.path, Reason.DUPLICATE_ROW, "its content is listed again "
                                                  "later with a different label", "keep one row with the correct label"))
            keep = [p for p in range(len(kept)) if p not in relabelled]
            store.keep(keep)
            kept, infos = [kept[p] for p in keep], [infos[p] for p in keep]
        images = store.finish()
    used = [entries[i] for i in kept]
    used_rows = {e.row for e in used}
    shared = sorted({tuple(sorted(r for r in by.values() if r in used_rows)) for by in owners.values()})
    labels = np.array([e.label for e in used], dtype=np.int64)
    pids = [e.patient_id for e in used]
    paths = [e.path for e in used]
    train, holdout = site_split(cfg.data.split, labels, pids, paths, cfg.data.holdout_fraction, cfg.seed)
    unused = np.empty(0, dtype=np.int64)
    if per_patient:
        train, unused = one_scan_per_patient(train, pids, paths, cfg.seed)
    return SiteData(
        classes=list(cfg.data.classes), images=images, labels=labels,
        rows=np.array([e.row for e in used], dtype=np.int64), patient_ids=pids, infos=infos,
        train=train, holdout=holdout, n_rows=n_rows, quarantine=sorted(quarantine, key=lambda q: q.row),
        cache_hits=cache.hits if cache else 0, cache_misses=cache.misses if cache else 0, unused=unused,
        shared_content=[list(g) for g in shared if len(g) > 1])
