"""Dirichlet(alpha) non-IID label partition of a training split across K hospital sites.

For every class c, proportions p_c ~ Dir(alpha * 1_K) are drawn and the class's shuffled indices are cut into K
consecutive pieces of sizes ~ p_c * n_c. Small alpha (0.1) gives each site a few dominant classes; large alpha (100)
approaches an IID split. If some site ends up with fewer than `min_per_site` records the whole draw is repeated (the
generator keeps advancing, so the result is still a function of the seed), at most `max_attempts` times.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from medfdd.errors import MedfddError


class PartitionError(MedfddError):
    """The requested non-IID partition is impossible or kept leaving a site (almost) empty."""


@dataclass(frozen=True)
class Partition:
    """Per-site sorted index arrays into the partitioned split and the site x class count table."""

    site_indices: list[np.ndarray]
    table: np.ndarray  # (n_sites, n_classes) int64
    alpha: float
    seed: int
    attempts: int = 1
    min_per_site: int = 1
    meta: dict = field(default_factory=dict)

    @property
    def n_sites(self) -> int:
        return len(self.site_indices)

    @property
    def site_totals(self) -> np.ndarray:
        return self.table.sum(axis=1)

    @property
    def class_totals(self) -> np.ndarray:
        return self.table.sum(axis=0)

    def site_of(self, n: int) -> np.ndarray:
        """For each of the `n` records, the index of the site it went to."""
        owner = np.full(n, -1, dtype=np.int64)
        for s, idx in enumerate(self.site_indices):
            owner[idx] = s
        return owner

    def as_dict(self, site_ids: list[str], classes: list[str]) -> dict:
        """JSON-ready: {"sites": {site_id: {class: count, ..., "total": n}}, "classes": [...], ...}."""
        return {
            "alpha": self.alpha,
            "seed": self.seed,
            "attempts": self.attempts,
            "min_per_site": self.min_per_site,
            "classes": list(classes),
            "sites": {sid: {**{c: int(v) for c, v in zip(classes, row, strict=True)}, "total": int(row.sum())}
                      for sid, row in zip(site_ids, self.table, strict=True)},
            "class_totals": {c: int(v) for c, v in zip(classes, self.class_totals, strict=True)},
            "total": int(self.table.sum()),
        }


def mean_class_entropy(table: np.ndarray) -> float:
    """Mean over sites of the normalised entropy of the site's class distribution: 1 = uniform (IID), 0 = one class."""
    table = np.asarray(table, dtype=np.float64)
    n_classes = table.shape[1]
    if n_classes < 2:
        return 1.0
    ent = []
    for row in table:
        total = row.sum()
        if total == 0:
            continue
        p = row[row > 0] / total
        ent.append(float(-(p * np.log(p)).sum() / math.log(n_classes)))
    return float(np.mean(ent)) if ent else 0.0


def dirichlet_partition(
    labels: np.ndarray,
    *,
    n_sites: int,
    alpha: float,
    seed: int,
    n_classes: int | None = None,
    min_per_site: int = 1,
    max_attempts: int = 100,
) -> Partition:
    """Split record indices 0..N-1 across `n_sites` with per-class Dirichlet(alpha) proportions (seeded).

    Every site gets at least `min_per_site` records, else the draw is repeated up to `max_attempts` times and then a
    `PartitionError` says which alpha/site count failed and what to change.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise PartitionError("labels", f"expected a 1-D array of class indices, got shape {labels.shape}",
                             "pass one integer label per record")
    n = len(labels)
    if isinstance(n_sites, bool) or not isinstance(n_sites, (int, np.integer)) or n_sites < 1:
        raise PartitionError("--sites", f"must be a positive integer, got {n_sites!r}", "use --sites 2 or more")
    if not (isinstance(alpha, (int, float, np.floating)) and math.isfinite(alpha) and alpha > 0):
        raise PartitionError("--alpha", f"must be a finite number > 0, got {alpha!r}",
                             "use e.g. 0.1 (very non-IID), 0.5 or 100 (almost IID)")
    if min_per_site < 0 or max_attempts < 1:
        raise PartitionError("min_per_site/max_attempts", f"got {min_per_site}/{max_attempts}",
                             "use min_per_site >= 0 and max_attempts >= 1")
    if n and (labels.min() < 0):
        raise PartitionError("labels", f"negative class index {labels.min()}", "use class indices 0..K-1")
    k_classes = int(n_classes if n_classes is not None else (labels.max() + 1 if n else 0))
    if n and labels.max() >= k_classes:
        raise PartitionError("labels", f"class index {labels.max()} >= n_classes {k_classes}", "pass the right n_classes")
    if n_sites * min_per_site > n:
        raise PartitionError(f"--sites {n_sites}",
                             f"{n_sites} sites x at least {min_per_site} records each needs {n_sites * min_per_site} "
                             f"records but the training split holds {n}",
                             "use fewer sites, or raise --max-per-class / use a larger source")

    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in range(k_classes)]
    smallest = -1
    for attempt in range(1, max_attempts + 1):
        pieces: list[list[np.ndarray]] = [[] for _ in range(n_sites)]
        table = np.zeros((n_sites, k_classes), dtype=np.int64)
        for c, idx in enumerate(by_class):
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(n_sites, float(alpha)))
            if not np.all(np.isfinite(p)):  # extreme alphas can underflow: give the class to one site
                p = np.eye(n_sites)[rng.integers(n_sites)]
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
            for s, part in enumerate(np.split(idx, cuts)):
                pieces[s].append(part)
                table[s, c] = len(part)
        sizes = table.sum(axis=1)
        smallest = int(sizes.min())
        if smallest >= min_per_site:
            site_indices = [np.sort(np.concatenate(p)).astype(np.int64) for p in pieces]
            return Partition(site_indices, table, float(alpha), int(seed), attempt, int(min_per_site))
    raise PartitionError(
        f"--alpha {alpha} with --sites {n_sites}",
        f"after {max_attempts} Dirichlet draws some site still had fewer than {min_per_site} records "
        f"(smallest site in the last draw: {smallest} of {n} records)",
        "raise --alpha (less skew), use fewer --sites, or use more data (raise --max-per-class)")
