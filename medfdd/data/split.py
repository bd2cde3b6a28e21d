"""Patient-level train / audit-holdout split: seeded, deterministic, no patient on both sides.

Two rules (`data.split`): `stable` (default) puts each patient on a side by a keyed hash of that patient's own id,
so adding or removing patients never moves another one and the site's DP guarantee holds for every patient in the
manifest; `stratified` permutes each class's patients so each class keeps exactly `holdout_fraction` of them in the
holdout (the guarantee is then for the training set it produced: one more patient can reshuffle the others).
Rows without a patient id each count as their own patient (keyed by their path under `stable`).
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict

import numpy as np

SPLITS = ("stable", "stratified")


def site_split(method: str, labels: np.ndarray, patient_ids: list[str | None], paths: list[str],
               holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (train_indices, holdout_indices) by the site's `data.split` rule."""
    if method == "stable":
        return stable_split(patient_ids, paths, holdout_fraction, seed)
    if method == "stratified":
        return patient_split(labels, patient_ids, holdout_fraction, seed)
    raise ValueError(f"unknown split {method!r}: use one of {SPLITS}")


def _keyed_hash(text: str, seed: int) -> bytes:
    return hashlib.blake2b(text.encode(), digest_size=16, key=str(int(seed)).encode()).digest()


def stable_split(patient_ids: list[str | None], paths: list[str], holdout_fraction: float, seed: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """-> (train_indices, holdout_indices), both sorted: a patient is held out when the keyed hash of its id, read
    as a number in [0, 1), is below `holdout_fraction` (a row without a patient id: the hash of its path).

    Each patient's side depends on that patient alone, so for neighbouring manifests (one patient added or removed)
    the training sets differ by at most that patient's scans: a mechanism that is (epsilon, delta)-DP in its
    training set is then (epsilon, delta)-DP in the whole manifest (the training sets of neighbouring manifests
    are neighbours). Each class holds out about `holdout_fraction` of its patients (binomially, not exactly).
    """
    side: dict[str, bool] = {}
    hold: list[int] = []
    for i, pid in enumerate(patient_ids):
        key = f"patient\0{pid}" if pid is not None else f"path\0{paths[i]}"
        if key not in side:
            side[key] = int.from_bytes(_keyed_hash(key, seed)[:8], "big") < holdout_fraction * 2.0**64
        if side[key]:
            hold.append(i)
    holdout = np.array(hold, dtype=np.int64)
    return np.setdiff1d(np.arange(len(patient_ids), dtype=np.int64), holdout), holdout


def patient_split(labels: np.ndarray, patient_ids: list[str | None], holdout_fraction: float, seed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """-> (train_indices, holdout_indices), both sorted; every index lands in exactly one of them. Per class of
    patients (by majority label) a seeded permutation holds out round(holdout_fraction x patients), keeping at least
    one patient of each class for training."""
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
        h = _keyed_hash(f"{pid}\0{paths[i]}", seed)
        if pid not in best or (h, i) < best[pid]:
            best[pid] = (h, i)
    kept.extend(i for _, i in best.values())
    keep = np.array(sorted(kept), dtype=np.int64)
    return keep, np.setdiff1d(np.asarray(train, dtype=np.int64), keep)


def split_units(patient_ids: list[str | None], rows: np.ndarray, scope: str = "") -> np.ndarray:
    """The split's unit (its coin) for each record `rows[i]`: `scope` + its patient id; a record without one is its
    own unit. Group ids for per-patient statistics (`privacy.audit.metrics.auc_p_value`)."""
    return np.array([f"{scope}\0{patient_ids[i]}" if patient_ids[i] is not None else f"{scope}\0\0{i}"
                     for i in np.asarray(rows).tolist()], dtype=object)


MEMBERS_FILE = "members.json"  # at the site only: which records each released round trained on (as digests)


def split_digest(rows: np.ndarray, train: np.ndarray, holdout: np.ndarray, method: str) -> dict:
    """Digests of the manifest rows on each side of the split (and the rule that made it), so that an audit can
    tell whether it rebuilds the same members and non-members as the release used (a changed manifest, seed or
    rule moves patients)."""
    def digest(a: np.ndarray) -> str:
        return hashlib.blake2b(np.asarray(a, dtype=np.int64).tobytes(), digest_size=16).hexdigest()

    return {"train": digest(rows[train]), "holdout": digest(rows[holdout]), "n_train": int(len(train)),
            "n_holdout": int(len(holdout)), "split": method}
