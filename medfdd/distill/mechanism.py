"""The Gaussian mechanism on per-class sums (one record touches one class block).

Each sampled record contributes the vector v_i = [c_feat * e_i / |e_i|, c_count] placed in its class's block, so
|v_i| = C with c_feat^2 + c_count^2 = C^2. The concatenation of all class blocks therefore has L2
sensitivity C under adding/removing one record, and Gaussian noise N(0, (sigma C)^2) on every coordinate makes the
release (sigma)-Gaussian; with Poisson sampling at rate q its privacy is accounted by Opacus (Mironov et al. 2019,
subsampled RDP). The count coordinate gives a private class count, so no real count is used to normalise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

COUNT_SHARE = 0.5  # fraction of C^2 given to the count coordinate: count noise std = sigma / sqrt(share)


@dataclass(frozen=True)
class NoisyClassStats:
    sums: torch.Tensor  # [K, d] noisy sum of the (scaled, clipped) features per class
    counts: torch.Tensor  # [K] noisy record counts per class
    feature_scale: float  # c_feat: features were multiplied by this before summing

    def means(self, min_count: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-class mean feature in the original unit-norm scale, mask of classes with a usable count)."""
        ok = self.counts >= min_count
        return self.sums / (self.feature_scale * self.counts.clamp(min=min_count)).unsqueeze(1), ok


def unit_rows(features: torch.Tensor, center: torch.Tensor | None = None) -> torch.Tensor:
    """Rows moved by a data-independent `center` (or not) and scaled to unit L2 norm."""
    f = features if center is None else features - center
    return f / f.norm(dim=1, keepdim=True).clamp(min=1e-12)


def record_vectors(features: torch.Tensor, clip_norm: float, center: torch.Tensor | None = None,
                   count_share: float = COUNT_SHARE) -> tuple[torch.Tensor, float, float]:
    """Per-record contributions: unit-norm features scaled to c_feat; returns (v, c_feat, c_count)."""
    if not 0 < count_share < 1:
        raise ValueError(f"count_share must lie in (0, 1), got {count_share}")
    c_feat = clip_norm * (1 - count_share) ** 0.5
    c_count = clip_norm * count_share**0.5
    return unit_rows(features, center) * c_feat, c_feat, c_count


def noisy_class_stats(features: torch.Tensor, labels: torch.Tensor, num_classes: int, *, clip_norm: float,
                      noise_multiplier: float, generator: torch.Generator | None,
                      center: torch.Tensor | None = None, count_share: float = COUNT_SHARE) -> NoisyClassStats:
    """Private per-class feature sums and counts of one Poisson-sampled batch (noise_multiplier 0 = exact).

    `center` must not depend on the real records (e.g. the synthetic set's mean feature): it is subtracted
    before normalising, which spreads the unit vectors without touching the sensitivity. `count_share` is the
    fraction of C^2 spent on the count coordinate (whatever the split, |v_i| = C).
    """
    v, c_feat, c_count = record_vectors(features.float(), clip_norm, center, count_share)
    d = v.shape[1]
    sums = torch.zeros(num_classes, d, device=v.device).index_add_(0, labels, v)
    counts = torch.zeros(num_classes, device=v.device).index_add_(0, labels, torch.full_like(labels, c_count,
                                                                                              dtype=torch.float32))
    if noise_multiplier > 0:
        std = noise_multiplier * clip_norm
        sums = sums + std * torch.randn(sums.shape, generator=generator, device="cpu").to(v.device)
        counts = counts + std * torch.randn(counts.shape, generator=generator, device="cpu").to(v.device)
    return NoisyClassStats(sums=sums, counts=counts / c_count, feature_scale=c_feat)
