"""Merge the accepted synthetic sets into the global training set.

- concat (default): the union, every image weight 1.
- balanced: the union with per-image weights so every class present carries the same total weight
  (non-IID sites leave some classes with few images).
- evidence: the union with per-image weights that give each site's images of a class that site's share of the
  class's evidence (its estimated records of the class, `class_evidence` in synthetic.json: the released noisy
  counts over the sample rate, post-processing), raised to `evidence_power`. A site with few records of a class
  distils mostly noise for it (the noise of a DP class mean scales like 1 / records); inverse-variance pooling of
  such means weights them by records^2 (power 2). Every class keeps the total weight of its images. Falls back to
  weight 1 when an offer carries no evidence.
- redistill: non-private distribution matching (Zhao & Bilen, WACV'23) of the union down to a global IPC; it reads
  only DP outputs, so it is post-processing and costs no privacy (Dwork & Roth 2014, Prop. 2.1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medfdd.config import CoordinatorConfig, DistillConfig
from medfdd.coordinator.validate import AcceptedOffer


@dataclass
class MergedSet:
    images: np.ndarray  # float32 [N, C, *spatial]
    labels: np.ndarray  # int64 [N]
    weights: np.ndarray  # float32 [N], mean 1
    sources: list[str]  # site ids that contributed
    note: str = ""  # how the weights were set, when that needs saying (e.g. a fallback)

    @property
    def training_weights(self) -> np.ndarray | None:
        """The per-example loss weights for training, or None when every image weighs 1 (plain mean loss)."""
        return None if np.all(self.weights == 1) else self.weights

    @property
    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels)


def class_balanced_weights(labels: np.ndarray) -> np.ndarray:
    counts = np.bincount(labels)
    present = int((counts > 0).sum())
    w = len(labels) / (present * counts[labels])
    return w.astype(np.float32)


def evidence_weights(evidence: np.ndarray, site_of: np.ndarray, labels: np.ndarray, power: float) -> np.ndarray:
    """Per-image weights (mean 1): image i of site s, class c gets N_c * share[s, c] / n[s, c], where N_c and n[s, c]
    count the class's images in the union and from site s, and share[s, c] = e[s, c]^power / sum over the sites that
    sent images of c (evidence e [sites, K] clipped at 0). A class without positive evidence shares equally."""
    n = np.zeros(evidence.shape)
    np.add.at(n, (site_of, labels), 1)
    e = np.where(n > 0, np.clip(evidence, 0, None) ** power, 0.0)
    total = e.sum(0, keepdims=True)
    equal = (n > 0) / np.maximum((n > 0).sum(0, keepdims=True), 1)
    share = np.where(total > 0, e / np.where(total > 0, total, 1.0), equal)
    w = n.sum(0)[labels] * share[site_of, labels] / n[site_of, labels]
    return (w * len(w) / w.sum()).astype(np.float32)


def merge(offers: list[AcceptedOffer], cfg: CoordinatorConfig, *, num_classes: int, seed: int,
          device: torch.device | None = None) -> MergedSet:
    offers = sorted(offers, key=lambda o: o.site_id)  # arrival order must not change the result
    images = np.concatenate([o.images for o in offers])
    labels = np.concatenate([o.labels for o in offers])
    sources = [o.site_id for o in offers]
    if cfg.merge == "balanced":
        return MergedSet(images, labels, class_balanced_weights(labels), sources)
    if cfg.merge == "evidence":
        evidence = [o.meta.get("class_evidence") for o in offers]
        if any(e is None for e in evidence):
            missing = [o.site_id for o, e in zip(offers, evidence, strict=True) if e is None]
            return MergedSet(images, labels, np.ones(len(labels), dtype=np.float32), sources,
                             note=f"no class_evidence from {missing}: weight 1 for every image")
        site_of = np.concatenate([np.full(len(o.labels), i) for i, o in enumerate(offers)])
        w = evidence_weights(np.asarray(evidence, dtype=np.float64), site_of, labels, cfg.evidence_power)
        return MergedSet(images, labels, w, sources)
    if cfg.merge == "redistill":
        images, labels = redistill(images, labels, cfg, num_classes=num_classes, seed=seed, device=device)
    return MergedSet(images, labels, np.ones(len(labels), dtype=np.float32), sources)


def redistill(images: np.ndarray, labels: np.ndarray, cfg: CoordinatorConfig, *, num_classes: int, seed: int,
              device: torch.device | None) -> tuple[np.ndarray, np.ndarray]:
    """Distribution matching of the union to cfg.redistill.ipc per class (classes absent from the union are dropped)."""
    from medfdd.distill.base import PrivacyPlan
    from medfdd.distill.distribution_matching import DistributionMatching

    r = cfg.redistill
    # redistill.ipc of every class present (uniform), 5 updates per step (non-private: every step is exact)
    dcfg = DistillConfig(ipc=r.ipc, iterations=r.iterations, batch_size=r.batch_size, inner_steps=5,
                         allocation="uniform")
    q = min(1.0, r.batch_size / len(labels))
    plan = PrivacyPlan(False, 0.0, q, r.iterations, dcfg.clip_norm)
    distiller = DistributionMatching(dcfg, plan, num_classes=num_classes, image_shape=tuple(images.shape[1:]),
                                     seed=seed, device=device)
    state = distiller.run(torch.as_tensor(images), torch.as_tensor(labels))
    out_x = state.result().cpu().numpy().astype(np.float32)
    out_y = state.labels.cpu().numpy().astype(np.int64)
    keep = np.isin(out_y, np.unique(labels))
    return out_x[keep], out_y[keep]


def union_of_rounds(sets: list[MergedSet]) -> MergedSet:
    """The merged sets of several rounds as one training set (each round's weights kept, renormalised to mean 1).
    Every round's set is built from offers already released under DP, so training on their union is post-processing
    (Dwork & Roth 2014, Prop. 2.1): it costs no privacy."""
    if len(sets) == 1:
        return sets[0]
    weights = np.concatenate([s.weights for s in sets]).astype(np.float32)
    return MergedSet(np.concatenate([s.images for s in sets]), np.concatenate([s.labels for s in sets]),
                     weights * np.float32(len(weights) / weights.sum()),
                     sorted({src for s in sets for src in s.sources}), note="; ".join(s.note for s in sets if s.note))


def load_merged(path: Path) -> MergedSet:
    """A merged set as the coordinator wrote it (`merged.npz`: images, labels, weights; np.load without pickle)."""
    with np.load(path, allow_pickle=False) as z:
        return MergedSet(z["images"], z["labels"], z["weights"], [])
