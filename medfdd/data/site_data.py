"""A site's data: manifest -> validated, preprocessed tensors + quarantine + patient-level split."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from medfdd.config import SiteConfig
from medfdd.data.cache import PreprocessCache, content_key, settings_fingerprint
from medfdd.data.load import ScanInfo, load_scan, preprocess_transform
from medfdd.data.manifest import read_manifest
from medfdd.data.quarantine import QuarantineEntry, Reason, RecordRejected
from medfdd.data.split import one_scan_per_patient, site_split
from medfdd.io import OutputWriteError


@dataclass
class SiteData:
    classes: list[str]
    images: np.ndarray  # float32 [N, C, *spatial], values in [0, 1]
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

    def class_counts(self, subset: np.ndarray | None = None) -> dict[str, int]:
        lab = self.labels if subset is None else self.labels[subset]
        counts = np.bincount(lab, minlength=len(self.classes))
        return {c: int(k) for c, k in zip(self.classes, counts, strict=True)}


def _cached_info(raw: dict) -> ScanInfo:
    """A cache entry's ScanInfo (TypeError / KeyError when another version wrote other fields: a miss)."""
    return ScanInfo(**{**raw, "original_shape": tuple(raw["original_shape"]), "instances": tuple(raw["instances"])})


def load_site_data(cfg: SiteConfig, *, on_record: Callable[[int, int], None] | None = None) -> SiteData:
    """Load every manifest row of a site; unusable rows are quarantined, never dropped silently.

    `on_record(done, total)` is called after each row (progress bars).
    """
    root = cfg.data_root
    entries, quarantine = read_manifest(root, cfg.data.manifest, cfg.data.classes)
    n_rows = len(entries) + len(quarantine)
    cache = PreprocessCache(cfg.cache_folder, cfg.data) if cfg.data.cache else None
    transform = preprocess_transform(cfg.data)
    spatial = tuple(cfg.data.spatial_size)
    images = np.empty((len(entries), cfg.data.channels, *spatial), dtype=np.float32)
    kept: list[int] = []
    infos: list[ScanInfo] = []
    fingerprint = cache.fingerprint if cache else settings_fingerprint(cfg.data)
    first_of: dict[str, int] = {}  # content key -> position in `kept` of the row that first held those bytes
    first_instance: dict[str, int] = {}  # SOPInstanceUID digest -> position in `kept` of the row that held it
    relabelled: set[int] = set()  # positions whose scan comes again later under another label
    per_patient = cfg.privacy.unit == "patient"

    def duplicate(pos: int, e, what: str) -> RecordRejected:
        """The same scan exported twice: one record counted twice by the accountant (and perhaps on both sides of
        the split)."""
        first = entries[kept[pos]]
        if first.label != e.label:
            relabelled.add(pos)
        return RecordRejected(Reason.DUPLICATE_ROW, f"{what} as row {first.row}" + (
            "" if first.label == e.label else " with a different label"), "list each scan once")

    for i, e in enumerate(entries):
        try:
            if per_patient and e.patient_id is None:  # its scans could not be bounded to one per patient
                raise RecordRejected(Reason.NO_PATIENT_ID, "privacy.unit is patient but this row has no patient_id",
                                     "add the patient_id column (the same id for all scans of a patient)")
            key = content_key(e.file, fingerprint, root)
            if key in first_of:
                raise duplicate(first_of[key], e, "same content")
            cached = cache.get(key, _cached_info) if cache else None
            if cached is not None and cached[0].shape == images.shape[1:]:
                x, info = cached
            else:
                x, info = load_scan(e.file, root=root, cfg=cfg.data, transform=transform)
                if cache:
                    cache.put(key, x, asdict(info))
            again = next((first_instance[d] for d in info.instances if d in first_instance), None)
            if again is not None:  # other bytes (re-encoded, re-anonymised), same DICOM object
                raise duplicate(again, e, "same DICOM object (SOPInstanceUID)")
            images[len(kept)] = x
            first_instance.update(dict.fromkeys(info.instances, len(kept)))
            first_of[key] = len(kept)
            kept.append(i)
            infos.append(info)
        except RecordRejected as r:
            quarantine.append(QuarantineEntry(e.row, e.path, r.reason, r.detail, r.fix))
        except OutputWriteError:  # the cache cannot be written (disk full, read-only output): not this scan's fault
            raise
        except OSError as err:  # permission denied, I/O error, vanished file
            quarantine.append(QuarantineEntry(e.row, e.path, Reason.UNREADABLE, f"{type(err).__name__}: {err}",
                                              "make the file readable by the site runner's user"))
        except Exception as err:  # noqa: BLE001 - whatever else one file does, it must not stop the site
            quarantine.append(QuarantineEntry(e.row, e.path, Reason.UNREADABLE,
                                              f"unexpected {type(err).__name__} while reading it: {err}"[:500],
                                              "re-export the file; report it to the medfdd maintainers if it "
                                              "opens in other viewers"))
        if on_record:
            on_record(i + 1, len(entries))
    if relabelled:  # the first row of a scan listed under two labels is ambiguous too
        for pos in sorted(relabelled):
            e = entries[kept[pos]]
            quarantine.append(QuarantineEntry(e.row, e.path, Reason.DUPLICATE_ROW, "its content is listed again "
                                              "later with a different label", "keep one row with the correct label"))
        keep = [p for p in range(len(kept)) if p not in relabelled]
        images[: len(keep)] = images[keep]
        kept, infos = [kept[p] for p in keep], [infos[p] for p in keep]
    used = [entries[i] for i in kept]
    labels = np.array([e.label for e in used], dtype=np.int64)
    pids = [e.patient_id for e in used]
    paths = [e.path for e in used]
    train, holdout = site_split(cfg.data.split, labels, pids, paths, cfg.data.holdout_fraction, cfg.seed)
    unused = np.empty(0, dtype=np.int64)
    if per_patient:
        train, unused = one_scan_per_patient(train, pids, paths, cfg.seed)
    return SiteData(
        classes=list(cfg.data.classes), images=images[: len(kept)], labels=labels,
        rows=np.array([e.row for e in used], dtype=np.int64), patient_ids=pids, infos=infos,
        train=train, holdout=holdout, n_rows=n_rows, quarantine=sorted(quarantine, key=lambda q: q.row),
        cache_hits=cache.hits if cache else 0, cache_misses=cache.misses if cache else 0, unused=unused)
