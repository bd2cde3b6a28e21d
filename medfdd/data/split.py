"""Patient-level train / audit-holdout split: seeded, deterministic, no patient on both sides.

Patients are stratified by their majority label so each class keeps roughly `holdout_fraction` of its patients
in the holdout; rows without a patient id each count as their own patient (per-row split).
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict

import numpy as np


def patient_split(labels: np.ndarray, patient_ids: list[str | None], holdout_fraction: float, seed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """-> (train_indices, holdout_indices), both sorted; every index lands in exactly one of them."""
    n = len(labels)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, pid in enumerate(patient_ids):
        groups[pid if pid is not None else f"\0row{i}"].append(i)
    by_class: dict[int, list[str]] = defaultdict(list)
    for pid, rows in groups.items():
        majority = Counter(int(labels[r]) for r in rows).most_common()
        top = max(c for c, k in majority if k == majority[0][1]) if majority else 0
        by_class[top].append(pid)
    rng = np.random.default_rng(seed)
    holdout: list[int] = []
    for cls in sorted(by_class):
        pids = sorted(by_class[cls])
        order = rng.permutation(len(pids))
        k = int(round(holdout_fraction * len(pids)))
        if holdout_fraction > 0 and k == len(pids) and len(pids) > 1:
            k -= 1  # keep at least one patient of each class for training
        for j in order[:k]:
            holdout.extend(groups[pids[j]])
    hold = np.array(sorted(holdout), dtype=np.int64)
    train = np.setdiff1d(np.arange(n, dtype=np.int64), hold)
    return train, hold


def one_scan_per_patient(train: np.ndarray, patient_ids: list[str | None], paths: list[str], seed: int
                         ) -> tuple[np.ndarray, np.ndarray]:
    """-> (kept, unused): of each training patient's scans, the one whose keyed hash of (patient id, path) is
    smallest; rows without a patient id are kept (each is its own patient).

    Contribution bounding for patient-level DP: a record-level (epsilon, delta) mechanism run on data with at most
    one record per patient is patient-level (epsilon, delta)-DP, provided which scan a patient contributes depends
    on that patient's own scans only (Dwork & Roth 2014, 2.2; the same bound as PipelineDP's
    max_contributions = 1). A hash of the patient's own rows, not a permutation of all rows, keeps that true:
    adding or removing one patient never changes the scan another patient contributes.
    """
    best: dict[str, tuple[bytes, int]] = {}
    kept: list[int] = []
    for i in np.asarray(train, dtype=np.int64).tolist():
        pid = patient_ids[i]
        if pid is None:
            kept.append(i)
            continue
        h = hashlib.blake2b(f"{pid}\0{paths[i]}".encode(), digest_size=16, key=str(int(seed)).encode()).digest()
        if pid not in best or (h, i) < best[pid]:
            best[pid] = (h, i)
    kept.extend(i for _, i in best.values())
    keep = np.array(sorted(kept), dtype=np.int64)
    return keep, np.setdiff1d(np.asarray(train, dtype=np.int64), keep)


MEMBERS_FILE = "members.json"  # at the site only: which records each released round trained on (as digests)


def split_digest(rows: np.ndarray, train: np.ndarray, holdout: np.ndarray) -> dict:
    """Digests of the manifest rows on each side of the split, so that an audit can tell whether it rebuilds the
    same members and non-members as the release used (a changed manifest or seed reshuffles patients)."""
    def digest(a: np.ndarray) -> str:
        return hashlib.blake2b(np.asarray(a, dtype=np.int64).tobytes(), digest_size=16).hexdigest()

    return {"train": digest(rows[train]), "holdout": digest(rows[holdout]), "n_train": int(len(train)),
            "n_holdout": int(len(holdout))}
