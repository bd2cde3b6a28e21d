"""Merge the accepted synthetic sets into the global training set.

- concat (default): the union, every image weight 1.
- balanced: the union with per-image weights so every class present carries the same total weight
  (non-IID sites leave some classes with few images).
- redistill: non-private distribution matching (Zhao & Bilen, WACV'23) of the union down to a global IPC; it reads
  only DP outputs, so it is post-processing and costs no privacy (Dwork & Roth 2014, Prop. 2.1).
"""

from __future__ import annotations

from dataclasses import dataclass

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

    @property
    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels)


def class_balanced_weights(labels: np.ndarray) -> np.ndarray:
    counts = np.bincount(labels)
    present = int((counts > 0).sum())
    w = len(labels) / (present * counts[labels])
    return w.astype(np.float32)


def merge(offers: list[AcceptedOffer], cfg: CoordinatorConfig, *, num_classes: int, seed: int,
          device: torch.device | None = None) -> MergedSet:
    offers = sorted(offers, key=lambda o: o.site_id)  # arrival order must not change the result
    images = np.concatenate([o.images for o in offers])
    labels = np.concatenate([o.labels for o in offers])
    sources = [o.site_id for o in offers]
    if cfg.merge == "balanced":
        return MergedSet(images, labels, class_balanced_weights(labels), sources)
    if cfg.merge == "redistill":
        images, labels = redistill(images, labels, cfg, num_classes=num_classes, seed=seed, device=device)
    return MergedSet(images, labels, np.ones(len(labels), dtype=np.float32), sources)


def redistill(images: np.ndarray, labels: np.ndarray, cfg: CoordinatorConfig, *, num_classes: int, seed: int,
              device: torch.device | None) -> tuple[np.ndarray, np.ndarray]:
    """Distribution matching of the union to cfg.redistill.ipc per class (classes absent from the union are dropped)."""
    from medfdd.distill.base import PrivacyPlan
    from medfdd.distill.distribution_matching import DistributionMatching

    r = cfg.redistill
    dcfg = DistillConfig(ipc=r.ipc, iterations=r.iterations, batch_size=r.batch_size)
    q = min(1.0, r.batch_size / len(labels))
    plan = PrivacyPlan(False, 0.0, q, r.iterations, dcfg.clip_norm)
    distiller = DistributionMatching(dcfg, plan, num_classes=num_classes, image_shape=tuple(images.shape[1:]),
                                     seed=seed, device=device)
    state = distiller.run(torch.as_tensor(images), torch.as_tensor(labels))
    out_x = state.result().cpu().numpy().astype(np.float32)
    out_y = state.labels.cpu().numpy().astype(np.int64)
    keep = np.isin(out_y, np.unique(labels))
    return out_x[keep], out_y[keep]
