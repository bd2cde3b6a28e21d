"""The Gaussian mechanism on per-class sums (one record touches one class block).

Each sampled record contributes the vector v_i = [c_feat * e_i / |e_i|, c_count] placed in its class's block, so
|v_i| = C with c_feat^2 + c_count^2 = C^2. The concatenation of all class blocks therefore has L2
sensitivity C under adding/removing one record, and Gaussian noise N(0, (sigma C)^2) on every coordinate makes the
release (sigma)-Gaussian; with Poisson sampling at rate q its privacy is accounted by Opacus (Mironov et al. 2019,
subsampled RDP). The count coordinate gives a private class count, so no real count is used to normalise.

The noise is drawn and added in float64. torch's float32 CPU sampler is Box-Muller over 24-bit uniforms, so its
|z| never exceeds sqrt(-2 ln 2^-24) = 5.77: the missing tail P(|Z| > 5.77) = 8e-9 per coordinate is output that
only a neighbouring data set can produce, an unaccounted delta. Here every uniform has 53 random bits (torch's
float64 `rand` keeps 53 bits of a 64-bit draw, ATen `transformation::uniform_real`; the secure source takes 53 of 64
bits from `os.urandom`), so |z| reaches 8.57 and the missing tail is P(|Z| > 8.57) = 1e-17 per coordinate.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from medfdd.errors import MedfddError


class SecureNoiseReplay(MedfddError):
    """A release under `noise_source: secure` would be drawn a second time under the charge of the first: its noise
    comes from OS randomness, so unlike keyed noise it cannot be replayed, and a second draw is a second release."""


NEXT_ROUND = ("leave this round as it is (its charge stays spent) and run the next round, a new release paid from the "
              "budget (plan it with privacy.rounds); keyed noise (privacy.noise_source: keyed) lets an interrupted "
              "round resume at any step")


def secure_replay_refused(where: str, what: str, fix: str = NEXT_ROUND) -> SecureNoiseReplay:
    """The error for a charged secure-noise release that cannot continue; `what`: why its draws are gone."""
    return SecureNoiseReplay(where, f"{what}; under privacy.noise_source: secure its noise cannot be replayed, and "
                             "new noise under the same charge would be a second release nobody paid for", fix)


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
                      noise_multiplier: float, generator: Rng,
                      center: torch.Tensor | None = None, count_share: float = COUNT_SHARE) -> NoisyClassStats:
    """Private per-class feature sums and counts of one Poisson-sampled batch (noise_multiplier 0 = exact).

    `center` must not depend on the real records (e.g. the synthetic set's mean feature): it is subtracted
    before normalising, which spreads the unit vectors without touching the sensitivity. `count_share` is the
    fraction of C^2 spent on the count coordinate (whatever the split, |v_i| = C). `generator`: the keyed torch
    generator of the step, or SECURE.
    """
    v, c_feat, c_count = record_vectors(features.float(), clip_norm, center, count_share)
    d = v.shape[1]
    sums = torch.zeros(num_classes, d, device=v.device).index_add_(0, labels, v)
    counts = torch.zeros(num_classes, device=v.device).index_add_(0, labels, torch.full_like(labels, c_count,
                                                                                              dtype=torch.float32))
    if noise_multiplier > 0:
        std = noise_multiplier * clip_norm
        sums = add_gaussian_noise(sums, std, generator)
        counts = add_gaussian_noise(counts, std, generator)
    return NoisyClassStats(sums=sums, counts=counts / c_count, feature_scale=c_feat)


class OSRandom:
    """The `secure` noise source (`privacy.noise_source: secure`): every uniform is read from the operating system's
    CSPRNG (`os.urandom`), so no seed, key or state can replay or predict a draw. It does not make floating-point
    sampling exact (Mironov 2012); like Opacus's `secure_mode`, each normal is the sum of 4 draws, halved, the
    mitigation of floating-point attacks on Gaussian noise that Opacus cites (Holohan & Braghin 2021, arXiv
    2107.10138, Sec. 5.1; Haney et al. 2022, arXiv 2112.05307)."""

    def __repr__(self) -> str:
        return "OSRandom()"


SECURE = OSRandom()
Rng = torch.Generator | OSRandom | None  # None: torch's global generator (tests, noise_multiplier 0)
SECURE_DRAWS = 4


def uniforms(n: int, rng: Rng) -> torch.Tensor:
    """n float64 uniforms on [0, 1), on the 2^-53 grid: from a torch generator, or from `os.urandom` (SECURE)."""
    if isinstance(rng, OSRandom):
        bits = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
        return torch.from_numpy(bits.astype(np.float64) * 2.0**-53)
    return torch.rand(n, generator=rng, dtype=torch.float64)


def box_muller(u: torch.Tensor) -> torch.Tensor:
    """2m standard normals from 2m float64 uniforms on [0, 1) (Box & Muller 1958): radius sqrt(-2 ln(1 - u)) from
    the first half, angle 2 pi u from the second."""
    m = u.numel() // 2
    radius = torch.sqrt(-2.0 * torch.log1p(-u[:m]))
    theta = 2.0 * math.pi * u[m:2 * m]
    return torch.cat([radius * torch.cos(theta), radius * torch.sin(theta)])


def standard_normal(shape: tuple[int, ...], rng: Rng) -> torch.Tensor:
    """float64 N(0, 1) of `shape` on the CPU from 53-bit uniforms (SECURE: the sum of 4 draws, halved)."""
    n = math.prod(shape)
    draws = SECURE_DRAWS if isinstance(rng, OSRandom) else 1
    z = sum(box_muller(uniforms(2 * ((n + 1) // 2), rng)) for _ in range(draws)) / math.sqrt(draws)
    return z[:n].reshape(shape)


def add_gaussian_noise(stat: torch.Tensor, std: float, rng: Rng) -> torch.Tensor:
    """stat + N(0, std^2) on every coordinate, added in float64 on the CPU, then rounded to float32 on stat's
    device (rounding the noisy value is post-processing)."""
    noisy = stat.to("cpu", torch.float64) + std * standard_normal(tuple(stat.shape), rng)
    return noisy.to(stat.device, torch.float32)
