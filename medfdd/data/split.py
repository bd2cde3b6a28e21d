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


MEMBERS_FILE = "members.json"  # at the site only: which records each released round trained on (as digests)


def split_digest(rows: np.ndarray, train: np.ndarray, holdout: np.ndarray) -> dict:
    """Digests of the manifest rows on each side of the split, so that an audit can tell whether it rebuilds the
    same members and non-members as the release used (a changed manifest or seed reshuffles patients)."""
    def digest(a: np.ndarray) -> str:
        return hashlib.blake2b(np.asarray(a, dtype=np.int64).tobytes(), digest_size=16).hexdigest()

    return {"train": digest(rows[train]), "holdout": digest(rows[holdout]), "n_train": int(len(train)),
            "n_holdout": int(len(holdout))}
